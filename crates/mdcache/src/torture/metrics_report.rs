//! Metrics of a torture run (`--metrics`): what a replica reports, how the
//! parent merges the replicas' reports, and the table it prints.
//!
//! A replica reports cumulative values (see [`protocol`](super::protocol)):
//! the parent keeps the last report of each replica process and sums them
//! (counters: values; histograms: counts, sums and buckets; the largest
//! maximum).

use std::collections::BTreeMap;

/// Upper bounds of the histogram buckets, in seconds; a last bucket holds
/// what lies above.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const BOUNDS: [f64; 4] = [0.001, 0.01, 0.1, 1.0];
const BUCKET_NAMES: [&str; 5] = ["≤1ms", "≤10ms", "≤100ms", "≤1s", ">1s"];

/// A histogram as count, sum, maximum and fixed buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) sum: f64,
    pub(crate) max: f64,
    pub(crate) buckets: [u64; 5],
}

impl Summary {
    /// Counts one observation (the recorder's; merging needs none).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn record(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        self.max = self.max.max(v);
        let i = BOUNDS.iter().position(|b| v <= *b).unwrap_or(BOUNDS.len());
        self.buckets[i] += 1;
    }

    fn merge(&mut self, other: &Summary) {
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }
}

/// A metric's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Value {
    Counter(u64),
    Histogram(Summary),
}

/// A metric's name and labels, sorted by label name.
pub(crate) type MetricKey = (String, Vec<(String, String)>);

/// The metrics of a whole run, summed over the replica processes.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub(crate) metrics: BTreeMap<MetricKey, Value>,
    /// How many replica processes reported.
    pub(crate) processes: usize,
}

impl Merged {
    /// Sums the last report of each replica process.
    pub(crate) fn of<'a>(
        reports: impl IntoIterator<Item = &'a BTreeMap<MetricKey, Value>>,
    ) -> Merged {
        let mut out = Merged::default();
        for report in reports {
            out.processes += 1;
            for (key, value) in report {
                match (out.metrics.get_mut(key), value) {
                    (Some(Value::Counter(a)), Value::Counter(b)) => *a += b,
                    (Some(Value::Histogram(a)), Value::Histogram(b)) => a.merge(b),
                    // One name, two types: the later report wins (a bug
                    // in the reporting process; nothing to add up).
                    (Some(slot), _) => *slot = *value,
                    (None, _) => {
                        out.metrics.insert(key.clone(), *value);
                    }
                }
            }
        }
        out
    }

    /// The metrics table, after the torture table.
    pub(crate) fn print(&self) {
        println!();
        println!(
            "metrics, summed over {} replica {}",
            self.processes,
            if self.processes == 1 {
                "process"
            } else {
                "processes"
            }
        );
        let name = |(n, labels): &MetricKey| {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            format!("{n}{{{}}}", labels.join(","))
        };
        let width = self
            .metrics
            .keys()
            .map(|k| name(k).len())
            .max()
            .unwrap_or(0);
        let counters: Vec<_> = self
            .metrics
            .iter()
            .filter_map(|(k, v)| match v {
                Value::Counter(n) => Some((name(k), *n)),
                Value::Histogram(_) => None,
            })
            .collect();
        if !counters.is_empty() {
            println!("{:<width$} {:>10}", "counter", "value");
            for (n, v) in counters {
                println!("{n:<width$} {v:>10}");
            }
        }
        let histograms: Vec<_> = self
            .metrics
            .iter()
            .filter_map(|(k, v)| match v {
                Value::Histogram(s) => Some((name(k), *s)),
                Value::Counter(_) => None,
            })
            .collect();
        if !histograms.is_empty() {
            let buckets: String = BUCKET_NAMES.iter().map(|b| format!(" {b:>7}")).collect();
            println!(
                "{:<width$} {:>10} {:>10} {:>10} {:>10}{buckets}",
                "histogram (seconds)", "count", "sum s", "mean ms", "max ms"
            );
            for (n, s) in histograms {
                let mean = if s.count == 0 {
                    0.0
                } else {
                    s.sum / s.count as f64
                };
                let buckets: String = s.buckets.iter().map(|b| format!(" {b:>7}")).collect();
                println!(
                    "{n:<width$} {:>10} {:>10.3} {:>10.3} {:>10.3}{buckets}",
                    s.count,
                    s.sum,
                    mean * 1e3,
                    s.max * 1e3
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> MetricKey {
        (name.to_owned(), vec![("backend".into(), "disk".into())])
    }

    #[test]
    fn replicas_add_up() {
        let mut h1 = Summary::default();
        h1.record(0.0005);
        h1.record(0.02);
        let mut h2 = Summary::default();
        h2.record(3.0);
        let a = BTreeMap::from([
            (key("c_total"), Value::Counter(3)),
            (key("h_seconds"), Value::Histogram(h1)),
        ]);
        let b = BTreeMap::from([
            (key("c_total"), Value::Counter(4)),
            (key("h_seconds"), Value::Histogram(h2)),
            (key("only_b_total"), Value::Counter(1)),
        ]);
        let m = Merged::of([&a, &b]);
        assert_eq!(m.processes, 2);
        assert_eq!(m.metrics[&key("c_total")], Value::Counter(7));
        assert_eq!(m.metrics[&key("only_b_total")], Value::Counter(1));
        let Value::Histogram(h) = m.metrics[&key("h_seconds")] else {
            panic!("a histogram");
        };
        assert_eq!((h.count, h.max, h.buckets), (3, 3.0, [1, 0, 1, 0, 1]));
        assert!((h.sum - 3.0205).abs() < 1e-12, "{}", h.sum);
    }
}
