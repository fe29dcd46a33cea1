//! Reading the table `mdcache torture` prints.

/// The value of row `name` (`{name:<30} {value:>12}`), panicking with the
/// whole table when the row is missing.
pub fn row<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            // The name is padded with spaces: a longer row name is another row.
            rest.starts_with(' ').then(|| rest.trim())
        })
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{text}"))
}

/// Asserts each `(row, value)` pair.
#[track_caller]
pub fn assert_rows(text: &str, rows: &[(&str, &str)]) {
    for (name, want) in rows {
        assert_eq!(row(text, name), *want, "row {name:?} in:\n{text}");
    }
}

/// The reasons a run failed: the lines after `FAIL `, in order.
pub fn failures(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .collect()
}
