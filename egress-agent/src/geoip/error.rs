//! What can go wrong reading a country database or placing it in the maps.

use std::path::PathBuf;

use aya::maps::MapError;

/// Why one line of a CSV database was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsvProblem {
    #[error("expected first_ip,last_ip,country_code but found {found} field(s)")]
    MissingFields { found: usize },
    #[error("{value:?} is not an IP address")]
    BadAddress { value: String },
    #[error("{first} and {last} are of different address families")]
    MixedFamilies { first: String, last: String },
    #[error("the first address {first} is after the last address {last}")]
    Reversed { first: String, last: String },
    #[error("{value:?} is not a two-letter country code")]
    BadCode { value: String },
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("reading country database {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: not UTF-8 text (a CSV database is expected unless the file is a MaxMind DB)", path.display())]
    NotText { path: PathBuf, line: usize },
    #[error("{}:{line}: {problem}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        problem: CsvProblem,
    },
    #[error("reading MaxMind DB {}: {source}", path.display())]
    Mmdb {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
    #[error("{}: network {network}: country code {value:?} is not two letters", path.display())]
    MmdbCode {
        path: PathBuf,
        network: String,
        value: String,
    },
    #[error(
        "the IPv6 /16 {bucket:04x}::/16 holds {ranges} ranges but a lookup can search at most {max}"
    )]
    BucketTooLarge {
        bucket: u32,
        ranges: usize,
        max: usize,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error(
        "map {name} is missing from the eBPF object (create the GeoWriter before Tables::new takes it)"
    )]
    GenerationMapTaken { name: &'static str },
    #[error("map {name} has an unexpected type or layout: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name} has {value_size}-byte values, expected {expected}")]
    ValueSize {
        name: &'static str,
        value_size: u32,
        expected: usize,
    },
    #[error("mapping {name} into memory (it must be created with BPF_F_MMAPABLE): {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("writing map {name}: {source}")]
    Write {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the dataplane was loaded without country tables ({name} holds {entries} entries); load it with LoadOptions.geo, as the agent does when --geoip is given"
    )]
    NotReserved { name: &'static str, entries: u32 },
    #[error(
        "the country database needs {needed} entries per generation in {name} but it holds {capacity} (start the agent with a larger {flag})"
    )]
    Capacity {
        name: &'static str,
        needed: usize,
        capacity: u32,
        flag: &'static str,
    },
}
