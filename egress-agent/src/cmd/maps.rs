//! `egress-agent maps`: each pinned map's type, entries and capacity.

use anyhow::Context as _;

use super::table;
use crate::{
    cli::MapsArgs,
    inspect::{MapRow, Pinned},
};

pub fn maps(args: &MapsArgs) -> anyhow::Result<()> {
    let MapsArgs { pin, json } = args;
    let pinned = Pinned::new(&pin.pin_path);
    let rows = pinned
        .maps()
        .with_context(|| format!("reading the maps pinned under {}", pin.pin_path.display()))?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render(&rows));
    }
    Ok(())
}

fn render(rows: &[MapRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            // Arrays always hold every index: their fill says nothing.
            let fill = match m.entries {
                Some(n) if m.capacity > 0 && !m.map_type.ends_with("array") => {
                    format!("{:.1}%", 100.0 * n as f64 / f64::from(m.capacity))
                }
                _ => String::new(),
            };
            vec![
                m.name.to_owned(),
                m.map_type.clone(),
                m.entries.map(|n| n.to_string()).unwrap_or_default(),
                m.capacity.to_string(),
                fill,
            ]
        })
        .collect();
    table::render(&["NAME", "TYPE", "ENTRIES", "CAPACITY", "FILL"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_table_fill_only_for_counted_maps() {
        let out = render(&[
            MapRow {
                name: "EG_CT4",
                map_type: "hash".into(),
                entries: Some(3),
                capacity: 1024,
            },
            MapRow {
                name: "EG_STATS",
                map_type: "percpu_array".into(),
                entries: Some(25),
                capacity: 25,
            },
            MapRow {
                name: "EG_EVENTS",
                map_type: "ringbuf".into(),
                entries: None,
                capacity: 1 << 20,
            },
        ]);
        assert_eq!(
            out,
            "NAME       TYPE          ENTRIES  CAPACITY  FILL\n\
             EG_CT4     hash          3        1024      0.3%\n\
             EG_STATS   percpu_array  25       25        -\n\
             EG_EVENTS  ringbuf       -        1048576   -\n"
        );
    }
}
