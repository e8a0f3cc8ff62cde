//! Reading one country database file (CSV `first_ip,last_ip,CC` ranges or a
//! MaxMind DB) into address ranges with dataplane country ids.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::error::{CsvProblem, GeoError};
use crate::policy::{geo, model::CountryCode};

/// The addresses `first..=last` (host order) are in country `country`
/// (a dataplane id; 0 = a code that is not a known country).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span<A> {
    pub first: A,
    pub last: A,
    pub country: u8,
}

/// Ranges of both families in the order a file lists them (a later one wins
/// where they overlap).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges {
    pub v4: Vec<Span<u32>>,
    pub v6: Vec<Span<u128>>,
}

impl Ranges {
    /// Add `first..=last` (of one family, `first <= last`).
    pub fn push(&mut self, first: IpAddr, last: IpAddr, country: u8) {
        match (first, last) {
            (IpAddr::V4(f), IpAddr::V4(l)) => self.v4.push(Span {
                first: f.into(),
                last: l.into(),
                country,
            }),
            (IpAddr::V6(f), IpAddr::V6(l)) => self.v6.push(Span {
                first: f.into(),
                last: l.into(),
                country,
            }),
            _ => debug_assert!(false, "a range is of one family"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Mmdb,
}

/// One database file, read.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub format: Format,
    pub ranges: Ranges,
    /// Codes that are not known countries (e.g. "EU", "ZZ") and how many
    /// ranges carry each; those ranges have country 0.
    pub unknown_codes: BTreeMap<String, usize>,
}

/// The marker that starts a MaxMind DB's metadata section, near its end.
const MMDB_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
/// The metadata section sits within this many bytes of the end.
const MMDB_METADATA_MAX: usize = 128 * 1024;

/// Read a database, choosing the format by extension (`.mmdb`) or, for
/// any other name, by looking for the MaxMind DB metadata marker.
pub fn read(path: &Path) -> Result<SourceFile, GeoError> {
    let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, bytes)
}

/// Parse a database's bytes as [`read`] does; `path` names the file in
/// errors and its extension (`.mmdb`) chooses the format.
pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<SourceFile, GeoError> {
    let by_extension = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("mmdb"));
    let mut codes = Codes::default();
    let (format, ranges) = if by_extension || is_mmdb(&bytes) {
        (Format::Mmdb, read_mmdb(path, bytes, &mut codes)?)
    } else {
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text,
            Err(err) => {
                let line = 1 + bytes[..err.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                return Err(GeoError::NotText {
                    path: path.to_owned(),
                    line,
                });
            }
        };
        (Format::Csv, parse_csv(path, text, &mut codes)?)
    };
    Ok(SourceFile {
        path: path.to_owned(),
        format,
        ranges,
        unknown_codes: codes.unknown,
    })
}

fn is_mmdb(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(MMDB_METADATA_MAX)..];
    tail.windows(MMDB_MARKER.len()).any(|w| w == MMDB_MARKER)
}

/// Country ids by code, remembered per file (a database repeats a few
/// hundred codes hundreds of thousands of times).
#[derive(Default)]
struct Codes {
    ids: HashMap<[u8; 2], u8>,
    unknown: BTreeMap<String, usize>,
}

impl Codes {
    /// The id of a two-letter code (any case); `None` if it is not two
    /// ASCII letters. Codes that are not countries give 0.
    fn id(&mut self, code: &str) -> Option<u8> {
        let &[a, b] = code.as_bytes() else {
            return None;
        };
        if !a.is_ascii_alphabetic() || !b.is_ascii_alphabetic() {
            return None;
        }
        let key = [a.to_ascii_uppercase(), b.to_ascii_uppercase()];
        Some(*self.ids.entry(key).or_insert_with(|| {
            // Ids are below 255 (policy::geo), so they fit a byte and never
            // collide with the block table's SPLIT marker.
            geo::country_id(CountryCode(key)).map_or(0, |id| id as u8)
        }))
    }

    /// Count a range whose code is not a known country.
    fn note_unknown(&mut self, code: &str) {
        *self.unknown.entry(code.to_ascii_uppercase()).or_default() += 1;
    }
}

/// One CSV field without surrounding blanks and double quotes.
fn field(text: &str) -> &str {
    let text = text.trim();
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text)
}

fn address(value: &str) -> Result<IpAddr, CsvProblem> {
    value.parse().map_err(|_| CsvProblem::BadAddress {
        value: value.to_owned(),
    })
}

/// Parse `first_ip,last_ip,CC` lines (IPv4 and IPv6 may mix, blank lines
/// are skipped, further fields are ignored). The first line may be a
/// header: it is skipped when its first field looks nothing like an address.
fn parse_csv(path: &Path, text: &str, codes: &mut Codes) -> Result<Ranges, GeoError> {
    // A byte order mark would hide the first line's first digit.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut ranges = Ranges::default();
    let mut seen_record = false;
    for (index, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let first_line = !seen_record;
        seen_record = true;
        let mut fields = line.split(',');
        let (Some(first), Some(last), Some(code)) = (fields.next(), fields.next(), fields.next())
        else {
            if first_line && is_header(line.split(',').next().unwrap_or("")) {
                continue;
            }
            return Err(GeoError::Csv {
                path: path.to_owned(),
                line: index + 1,
                problem: CsvProblem::MissingFields {
                    found: line.split(',').count(),
                },
            });
        };
        let (first, last, code) = (field(first), field(last), field(code));
        if first_line && is_header(first) {
            continue;
        }
        let mut record = || -> Result<(IpAddr, IpAddr, u8), CsvProblem> {
            let (a, b) = (address(first)?, address(last)?);
            if a.is_ipv4() != b.is_ipv4() {
                return Err(CsvProblem::MixedFamilies {
                    first: first.to_owned(),
                    last: last.to_owned(),
                });
            }
            if a > b {
                return Err(CsvProblem::Reversed {
                    first: first.to_owned(),
                    last: last.to_owned(),
                });
            }
            let country = codes.id(code).ok_or_else(|| CsvProblem::BadCode {
                value: code.to_owned(),
            })?;
            if country == 0 {
                codes.note_unknown(code);
            }
            Ok((a, b, country))
        };
        let (a, b, country) = record().map_err(|problem| GeoError::Csv {
            path: path.to_owned(),
            line: index + 1,
            problem,
        })?;
        ranges.push(a, b, country);
    }
    Ok(ranges)
}

/// A header names its columns: no address characters at its start
/// (`first_ip`, `network_start`), unlike a mistyped address (`1.2.3.x`).
fn is_header(first_field: &str) -> bool {
    let f = field(first_field);
    !f.contains(':') && !f.starts_with(|c: char| c.is_ascii_digit())
}

/// The parts of a record this reader understands: the ip-location-db layout
/// (`country_code`) and MaxMind's GeoIP2/GeoLite2 Country layout.
#[derive(Deserialize)]
struct MmdbRecord<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

impl<'a> MmdbRecord<'a> {
    /// Where the address is; for GeoLite2, the registrant's country when
    /// the record gives no location.
    fn code(&self) -> Option<&'a str> {
        self.country_code
            .or_else(|| self.country.as_ref().and_then(|c| c.iso_code))
            .or_else(|| self.registered_country.as_ref().and_then(|c| c.iso_code))
    }
}

/// Every network of a MaxMind DB, in address order. Networks whose record
/// names no country are left out (their addresses stay unknown).
fn read_mmdb(path: &Path, bytes: Vec<u8>, codes: &mut Codes) -> Result<Ranges, GeoError> {
    let mmdb_err = |source| GeoError::Mmdb {
        path: path.to_owned(),
        source,
    };
    let reader = maxminddb::Reader::from_source(bytes.as_slice()).map_err(mmdb_err)?;
    check_walk(&bytes, reader.metadata())
        .map_err(|message| mmdb_err(maxminddb::MaxMindDbError::invalid_database(message)))?;
    let mut ranges = Ranges::default();
    // A few hundred distinct records serve a million networks: decode each once.
    let mut by_offset: HashMap<usize, Option<(u8, &str)>> = HashMap::new();
    for item in reader.networks(Default::default()).map_err(mmdb_err)? {
        let item = item.map_err(mmdb_err)?;
        let Some(offset) = item.offset() else {
            continue;
        };
        let network = item.network().map_err(mmdb_err)?;
        let found = match by_offset.get(&offset) {
            Some(&found) => found,
            None => {
                let record: Option<MmdbRecord<'_>> = item.decode().map_err(mmdb_err)?;
                let found = match record.as_ref().and_then(MmdbRecord::code) {
                    None => None,
                    Some(code) => {
                        let id = codes.id(code).ok_or_else(|| GeoError::MmdbCode {
                            path: path.to_owned(),
                            network: network.to_string(),
                            value: code.to_owned(),
                        })?;
                        Some((id, code))
                    }
                };
                by_offset.insert(offset, found);
                found
            }
        };
        let Some((country, code)) = found else {
            continue;
        };
        if country == 0 {
            codes.note_unknown(code);
        }
        let (first, prefix) = (network.network(), u32::from(network.prefix()));
        match first {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                let host = u32::MAX.checked_shr(prefix).unwrap_or(0);
                ranges.v4.push(Span {
                    first: a,
                    last: a | host,
                    country,
                });
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                let host = u128::MAX.checked_shr(prefix).unwrap_or(0);
                ranges.v6.push(Span {
                    first: a,
                    last: a | host,
                    country,
                });
            }
        }
    }
    Ok(ranges)
}

/// Visits a walk of a MaxMind DB's search tree may make, per node. A tree
/// is walked in about two per node (each record is followed once); twice
/// that leaves room for a writer that shares a few subtrees.
const MMDB_VISITS_PER_NODE: usize = 4;

/// Check that listing a MaxMind DB's networks takes time in proportion to
/// its size. The search tree should be a tree, but nothing in the format
/// makes it one: records of different nodes may point at the same node,
/// and a chain of 128 nodes whose two records both point at the next (one
/// kilobyte) describes 2^127 networks, which the reader's iterator would
/// list forever. So walk the tree the way the iterator does (depth first;
/// records past `node_count` are leaves; an IPv6 database's IPv4 subtree
/// is entered only at `::/96`, its aliases are skipped) and give up past
/// a budget of visits.
fn check_walk(buf: &[u8], metadata: &maxminddb::Metadata) -> Result<(), String> {
    let node_count = metadata.node_count as usize;
    let node_bytes = usize::from(metadata.record_size) / 4;
    let bits: u32 = if metadata.ip_version == 6 { 128 } else { 32 };
    let record = |node: usize, right: bool| -> Result<usize, String> {
        let b = node
            .checked_mul(node_bytes)
            .and_then(|at| buf.get(at..at.checked_add(node_bytes)?))
            .ok_or_else(|| format!("search tree node {node} is past the end of the file"))?;
        let be = |bytes: &[u8]| bytes.iter().fold(0usize, |n, &b| n << 8 | usize::from(b));
        Ok(match (metadata.record_size, right) {
            (24, false) => be(&b[..3]),
            (24, true) => be(&b[3..6]),
            (28, false) => usize::from(b[3] >> 4) << 24 | be(&b[..3]),
            (28, true) => usize::from(b[3] & 0x0f) << 24 | be(&b[4..7]),
            (32, false) => be(&b[..4]),
            (32, true) => be(&b[4..8]),
            (size, _) => return Err(format!("unsupported record size {size}")),
        })
    };
    // As the reader finds it: 96 steps left from the root, if still a node.
    let mut ipv4_start = 0;
    if bits == 128 {
        for _ in 0..96 {
            if ipv4_start >= node_count {
                break;
            }
            ipv4_start = record(ipv4_start, false)?;
        }
    }
    let budget = node_count
        .saturating_mul(MMDB_VISITS_PER_NODE)
        .saturating_add(64);
    let mut visits = 0usize;
    // (node, depth, whether every bit so far within the first 96 is 0)
    let mut stack = vec![(0usize, 0u32, true)];
    while let Some((node, depth, zero_prefix)) = stack.pop() {
        visits += 1;
        if visits > budget {
            return Err(format!(
                "the search tree is not a tree: listing its networks visits more than {budget} nodes, and it has {node_count}"
            ));
        }
        let alias = bits == 128 && ipv4_start != 0 && node == ipv4_start && !zero_prefix;
        // A leaf, an alias of the IPv4 subtree, or a cycle (which the
        // reader reports itself).
        if node >= node_count || alias || depth >= bits {
            continue;
        }
        let zero = |right: bool| zero_prefix && !(right && depth < 96);
        stack.push((record(node, true)?, depth + 1, zero(true)));
        stack.push((record(node, false)?, depth + 1, zero(false)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// Just enough of a MaxMind DB writer for these tests: an IPv6 tree
    /// (IPv4 networks under ::/96), 24-bit records, map/string records.
    mod mmdb {
        use std::net::IpAddr;

        pub fn string(s: &str) -> Vec<u8> {
            assert!(s.len() < 29);
            let mut out = vec![0x40 | s.len() as u8];
            out.extend_from_slice(s.as_bytes());
            out
        }

        pub fn map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
            let mut out = vec![0xe0 | entries.len() as u8];
            for (k, v) in entries {
                out.extend(string(k));
                out.extend_from_slice(v);
            }
            out
        }

        fn uint(control: &[u8], value: u64) -> Vec<u8> {
            let bytes: Vec<u8> = value
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            let mut out = control.to_vec();
            out[0] |= bytes.len() as u8;
            out.extend(bytes);
            out
        }

        /// A database whose networks (address, prefix length) carry `records`.
        pub fn build(networks: &[(IpAddr, u32, Vec<u8>)]) -> Vec<u8> {
            // A node's two children.
            #[derive(Clone, Copy)]
            enum Rec {
                Empty,
                Node(usize),
                Data(usize),
            }
            let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty; 2]];
            let mut data = Vec::new();
            for (addr, prefix, record) in networks {
                let (bits, prefix) = match addr {
                    IpAddr::V4(a) => (u128::from(u32::from(*a)), prefix + 96),
                    IpAddr::V6(a) => (u128::from(*a), *prefix),
                };
                let offset = data.len();
                data.extend_from_slice(record);
                let mut node = 0;
                for depth in 0..prefix {
                    let bit = (bits >> (127 - depth) & 1) as usize;
                    if depth + 1 == prefix {
                        nodes[node][bit] = Rec::Data(offset);
                    } else {
                        node = match nodes[node][bit] {
                            Rec::Node(next) => next,
                            _ => {
                                nodes.push([Rec::Empty; 2]);
                                let next = nodes.len() - 1;
                                nodes[node][bit] = Rec::Node(next);
                                next
                            }
                        };
                    }
                }
            }
            let count = nodes.len();
            let records: Vec<[usize; 2]> = nodes
                .iter()
                .map(|node| {
                    node.map(|rec| match rec {
                        Rec::Empty => count,
                        Rec::Node(n) => n,
                        Rec::Data(offset) => count + 16 + offset,
                    })
                })
                .collect();
            from_records(&records, &data)
        }

        /// A database with these node records (values as stored: a node
        /// number, `len` for "no data", `len + 16 + offset` for a record
        /// in `data`), whether or not they form a tree.
        pub fn from_records(records: &[[usize; 2]], data: &[u8]) -> Vec<u8> {
            let count = records.len();
            let mut out = Vec::new();
            for value in records.iter().flatten() {
                out.extend_from_slice(&(*value as u32).to_be_bytes()[1..]);
            }
            out.extend([0u8; 16]);
            out.extend(data);
            out.extend_from_slice(super::MMDB_MARKER);
            let mut meta = vec![0xe9];
            for (key, value) in [
                ("binary_format_major_version", uint(&[0xa0], 2)),
                ("binary_format_minor_version", uint(&[0xa0], 0)),
                ("build_epoch", uint(&[0x00, 0x02], 1_700_000_000)),
                ("database_type", string("test")),
                ("description", vec![0xe0]),
                ("ip_version", uint(&[0xa0], 6)),
                ("languages", vec![0x00, 0x04]),
                ("node_count", uint(&[0xc0], count as u64)),
                ("record_size", uint(&[0xa0], 24)),
            ] {
                meta.extend(string(key));
                meta.extend(value);
            }
            out.extend(meta);
            out
        }
    }

    fn id(code: &str) -> u8 {
        geo::country_id(geo::lookup(code).unwrap().0).unwrap() as u8
    }

    fn read_bytes(name: &str, bytes: &[u8]) -> Result<SourceFile, GeoError> {
        let dir =
            std::env::temp_dir().join(format!("egress-geoip-src-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let result = read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn geoip_mmdb_both_layouts_and_fallback_read() {
        use mmdb::{map, string};
        let db = mmdb::build(&[
            // ip-location-db layout.
            (
                "1.0.0.0".parse().unwrap(),
                24,
                map(&[("country_code", string("AU"))]),
            ),
            // GeoLite2 layout: the location's country first...
            (
                "2.0.0.0".parse().unwrap(),
                16,
                map(&[
                    ("country", map(&[("iso_code", string("FR"))])),
                    ("registered_country", map(&[("iso_code", string("DE"))])),
                ]),
            ),
            // ...else the registrant's.
            (
                "2001:db8::".parse().unwrap(),
                32,
                map(&[("registered_country", map(&[("iso_code", string("PT"))]))]),
            ),
            // No country at all: left out.
            ("3.0.0.0".parse().unwrap(), 8, map(&[("traits", map(&[]))])),
            // A code that is no country.
            (
                "4.0.0.0".parse().unwrap(),
                8,
                map(&[("country_code", string("EU"))]),
            ),
        ]);
        // Named .dat, not .mmdb: found by its metadata marker.
        let file = read_bytes("db.dat", &db).unwrap();
        assert_eq!(file.format, Format::Mmdb, "sniffed as a MaxMind DB");
        assert_eq!(
            file.ranges.v4,
            vec![
                Span {
                    first: 0x0100_0000,
                    last: 0x0100_00ff,
                    country: id("AU")
                },
                Span {
                    first: 0x0200_0000,
                    last: 0x0200_ffff,
                    country: id("FR")
                },
                Span {
                    first: 0x0400_0000,
                    last: 0x04ff_ffff,
                    country: 0
                },
            ],
            "IPv4 networks in address order; the record without a country is left out"
        );
        let net: u128 = "2001:db8::".parse::<Ipv6Addr>().unwrap().into();
        assert_eq!(
            file.ranges.v6,
            vec![Span {
                first: net,
                last: net | (u128::MAX >> 32),
                country: id("PT")
            }],
            "registered_country is the fallback"
        );
        assert_eq!(file.unknown_codes, BTreeMap::from([("EU".to_owned(), 1)]));
    }

    #[test]
    fn geoip_mmdb_shared_nodes_rejected_not_walked_forever() {
        // Found while writing the geoip_mmdb fuzz target: 128 nodes whose
        // two records both point at the next describe 2^127 networks, and
        // without the check the read never ends.
        let count = 128;
        let data = mmdb::map(&[("country_code", mmdb::string("AU"))]);
        let records: Vec<[usize; 2]> = (0..count)
            .map(|i| {
                if i + 1 < count {
                    [i + 1, i + 1]
                } else {
                    [count + 16, count + 16]
                }
            })
            .collect();
        let err = read_bytes("dag.mmdb", &mmdb::from_records(&records, &data))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dag.mmdb") && err.contains("the search tree is not a tree"),
            "a search tree whose nodes are shared is refused, naming the file: {err}"
        );
    }

    #[test]
    fn geoip_mmdb_bad_code_names_network() {
        use mmdb::{map, string};
        let db = mmdb::build(&[(
            "5.0.0.0".parse().unwrap(),
            8,
            map(&[("country_code", string("USA"))]),
        )]);
        let err = read_bytes("bad.mmdb", &db).unwrap_err().to_string();
        assert!(
            err.ends_with("network 5.0.0.0/8: country code \"USA\" is not two letters"),
            "the error names the network and the value: {err}"
        );
    }
}
