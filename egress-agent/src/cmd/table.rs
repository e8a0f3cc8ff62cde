//! Plain-text tables for the listing subcommands: left-aligned columns
//! separated by two spaces, `-` for an empty cell.

/// Render `rows` under `headers`, one line each.
pub(crate) fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            text.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for row in &rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align_and_empty_cells_show_dash() {
        let out = render(
            &["ID", "USER", "GROUPS"],
            &[
                vec!["a".into(), "ana@example.com".into(), String::new()],
                vec!["laptop-2".into(), "bo".into(), "finance".into()],
            ],
        );
        assert_eq!(
            out,
            "ID        USER             GROUPS\n\
             a         ana@example.com  -\n\
             laptop-2  bo               finance\n"
        );
    }
}
