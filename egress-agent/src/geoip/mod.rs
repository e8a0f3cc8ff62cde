//! Destination-country databases: reading them (`--geoip`, CSV or MaxMind
//! DB), merging several, converting them into the dataplane's flat country
//! tables and writing those into the kernel with an atomic switch.

pub mod error;
pub mod merge;
pub mod source;
pub mod table;
pub mod writer;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

pub use error::{CsvProblem, GeoError};
pub use merge::Merged;
pub use source::{Format, Ranges, SourceFile, Span};
pub use table::{GeoTables, TableStats};
pub use writer::{GeoReport, GeoWriter, MapMemory};

/// What reading one file found.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FileStats {
    pub path: PathBuf,
    pub format: Format,
    /// Ranges (CSV lines, MMDB networks) of each family.
    pub v4_ranges: usize,
    pub v6_ranges: usize,
    pub parse_ms: f64,
}

/// What reading the files found.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LoadStats {
    pub files: Vec<FileStats>,
    /// Codes that are not known countries, with how many ranges carry each
    /// (over all files); their addresses are unknown.
    pub unknown_codes: BTreeMap<String, usize>,
}

/// Read `paths` in order and build the tables: where ranges overlap, a
/// later file wins (and within a file, a later line). Codes that are not
/// countries make their ranges unknown, with one warning naming them.
pub fn load(paths: &[PathBuf]) -> Result<(GeoTables, LoadStats), GeoError> {
    let parse_start = Instant::now();
    let mut stats = LoadStats::default();
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let start = Instant::now();
        let file = source::read(path)?;
        stats.files.push(FileStats {
            path: path.clone(),
            format: file.format,
            v4_ranges: file.ranges.v4.len(),
            v6_ranges: file.ranges.v6.len(),
            parse_ms: start.elapsed().as_secs_f64() * 1e3,
        });
        for (code, n) in &file.unknown_codes {
            *stats.unknown_codes.entry(code.clone()).or_default() += n;
        }
        sources.push(file);
    }
    let parse_ms = parse_start.elapsed().as_secs_f64() * 1e3;
    if !stats.unknown_codes.is_empty() {
        let list: Vec<String> = stats
            .unknown_codes
            .iter()
            .map(|(code, n)| format!("{code} ({n})"))
            .collect();
        log::warn!(
            "country database: codes that are not ISO 3166-1 countries, their ranges count as unknown: {}",
            list.join(", ")
        );
    }
    let build_start = Instant::now();
    let merged = Merged::new(sources.iter().map(|s| &s.ranges));
    drop(sources);
    let mut tables = GeoTables::build(&merged)?;
    tables.stats.build_ms = build_start.elapsed().as_secs_f64() * 1e3;
    tables.stats.parse_ms = parse_ms;
    Ok((tables, stats))
}

/// Which of `paths` decides the country of `addr`, and what it says: the
/// last file with a range covering it (`None` when none does). For
/// `explain`; the answer equals the merged tables'.
pub fn locate(paths: &[PathBuf], addr: std::net::IpAddr) -> Result<Option<(&Path, u8)>, GeoError> {
    for path in paths.iter().rev() {
        let file = source::read(path)?;
        if let Some(country) = Merged::new([&file.ranges]).lookup(addr) {
            return Ok(Some((path, country)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::{
        net::IpAddr,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;
    use crate::policy::geo;

    /// A file under a fresh temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "egress-geoip-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn id(code: &str) -> u8 {
        geo::country_id(geo::lookup(code).expect("a country").0).expect("an id") as u8
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn csv_error(text: &str) -> String {
        let file = TempFile::new("db.csv", text);
        let err = load(std::slice::from_ref(&file.0))
            .expect_err("the file must be rejected")
            .to_string();
        let prefix = format!("{}:", file.0.display());
        assert!(
            err.starts_with(&prefix),
            "the error starts with the file's path: {err}"
        );
        err[prefix.len()..].to_owned()
    }

    #[test]
    fn geoip_csv_both_families_header_and_blank_lines_read() {
        let file = TempFile::new(
            "db.csv",
            "\u{feff}first_ip,last_ip,country_code\r\n\r\n1.0.0.0,1.0.0.255,AU\r\n\n\"2001:db8::\",\"2001:db8::ffff\",pt\n",
        );
        let (tables, stats) = load(std::slice::from_ref(&file.0)).unwrap();
        assert_eq!(tables.lookup(addr("1.0.0.7")), id("AU"));
        assert_eq!(
            tables.lookup(addr("2001:db8::10")),
            id("PT"),
            "quoted fields and lower-case codes are read"
        );
        assert_eq!(stats.files[0].format, Format::Csv);
        assert_eq!((stats.files[0].v4_ranges, stats.files[0].v6_ranges), (1, 1));
    }

    #[test]
    fn geoip_csv_byte_order_mark_before_first_record_read() {
        let file = TempFile::new("db.csv", "\u{feff}1.0.0.0,1.0.0.255,AU\n");
        let (tables, _) = load(std::slice::from_ref(&file.0)).unwrap();
        assert_eq!(
            tables.lookup(addr("1.0.0.7")),
            id("AU"),
            "the first record is read, not taken for a header"
        );
    }

    #[test]
    fn geoip_csv_errors_name_file_line_and_value() {
        for (text, want) in [
            (
                "1.0.0.0,1.0.0.255,AU\n1.0.1.0,1.0.1.x,AU\n",
                "2: \"1.0.1.x\" is not an IP address",
            ),
            (
                "1.0.0.0,1.0.0.255,AU\n\n1.0.0.9,1.0.0.1,AU\n",
                "3: the first address 1.0.0.9 is after the last address 1.0.0.1",
            ),
            (
                "1.0.0.0,2001:db8::1,AU\n",
                "1: 1.0.0.0 and 2001:db8::1 are of different address families",
            ),
            (
                "1.0.0.0,1.0.0.1,AUS\n",
                "1: \"AUS\" is not a two-letter country code",
            ),
            (
                "1.0.0.0,1.0.0.1,\n",
                "1: \"\" is not a two-letter country code",
            ),
            (
                "1.0.0.0,1.0.0.1,AU\n1.0.0.2;1.0.0.3;AU\n",
                "2: expected first_ip,last_ip,country_code but found 1 field(s)",
            ),
            (
                "1.2.3.x,1.2.3.4,AU\n",
                "1: \"1.2.3.x\" is not an IP address",
            ),
        ] {
            assert_eq!(csv_error(text), want, "for {text:?}");
        }
    }

    #[test]
    fn geoip_csv_unknown_codes_counted_and_unknown() {
        let file = TempFile::new(
            "db.csv",
            "1.0.0.0,1.0.0.255,EU\n1.0.1.0,1.0.1.255,EU\n1.0.2.0,1.0.2.255,ZZ\n1.0.3.0,1.0.3.255,FR\n",
        );
        let (tables, stats) = load(std::slice::from_ref(&file.0)).unwrap();
        assert_eq!(
            stats.unknown_codes,
            BTreeMap::from([("EU".to_owned(), 2), ("ZZ".to_owned(), 1)]),
            "each code that is no country is counted per range"
        );
        assert_eq!(tables.lookup(addr("1.0.0.1")), 0, "EU is no country");
        assert_eq!(tables.lookup(addr("1.0.3.1")), id("FR"));
    }

    #[test]
    fn geoip_files_later_file_overrides_earlier_where_it_covers() {
        let base = TempFile::new(
            "base.csv",
            "10.0.0.0,10.0.255.255,ES\n2001:db8::,2001:db8::ffff,ES\n",
        );
        let fix = TempFile::new("fix.csv", "10.0.1.0,10.0.1.127,PT\n");
        let paths = [base.0.clone(), fix.0.clone()];
        let (tables, _) = load(&paths).unwrap();
        assert_eq!(
            tables.lookup(addr("10.0.1.5")),
            id("PT"),
            "the later file wins inside its range"
        );
        assert_eq!(
            tables.lookup(addr("10.0.1.200")),
            id("ES"),
            "the earlier file answers outside it"
        );
        assert_eq!(tables.lookup(addr("2001:db8::1")), id("ES"));
        assert_eq!(
            locate(&paths, addr("10.0.1.5")).unwrap(),
            Some((fix.0.as_path(), id("PT"))),
            "explain names the file that decided"
        );
        assert_eq!(
            locate(&paths, addr("10.0.2.5")).unwrap(),
            Some((base.0.as_path(), id("ES")))
        );
        assert_eq!(
            locate(&paths, addr("10.1.0.0")).unwrap(),
            None,
            "no file covers it"
        );

        let (swapped, _) = load(&[fix.0.clone(), base.0.clone()]).unwrap();
        assert_eq!(
            swapped.lookup(addr("10.0.1.5")),
            id("ES"),
            "in the other order the wide range listed last wins"
        );
    }

    #[test]
    fn geoip_csv_overlapping_lines_later_line_wins() {
        let file = TempFile::new(
            "db.csv",
            "10.0.0.0,10.0.0.255,ES\n10.0.0.100,10.0.0.199,PT\n10.0.0.150,10.0.0.150,FR\n",
        );
        let (tables, _) = load(std::slice::from_ref(&file.0)).unwrap();
        for (a, c) in [
            ("10.0.0.99", "ES"),
            ("10.0.0.100", "PT"),
            ("10.0.0.150", "FR"),
            ("10.0.0.151", "PT"),
            ("10.0.0.200", "ES"),
        ] {
            assert_eq!(tables.lookup(addr(a)), id(c), "{a} is in {c}");
        }
    }

    #[test]
    fn geoip_missing_file_error_names_it() {
        let err = load(&[PathBuf::from("/nonexistent/geo.csv")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("reading country database /nonexistent/geo.csv: "),
            "the error names the file: {err}"
        );
    }

    #[test]
    fn geoip_mmdb_garbage_named_mmdb_rejected() {
        let file = TempFile::new("db.mmdb", "1.0.0.0,1.0.0.255,AU\n");
        let err = load(std::slice::from_ref(&file.0)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("reading MaxMind DB {}: ", file.0.display())),
            "a .mmdb file is read as a MaxMind DB: {err}"
        );
    }
}
