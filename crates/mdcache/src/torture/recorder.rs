//! The in-process metrics recorder of a replica (`torture --metrics`):
//! counters and histogram summaries, read at any time as a snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};

use super::metrics_report::{MetricKey, Summary, Value};

/// A histogram's summary, shared with its handles.
#[derive(Debug, Default)]
struct Hist(Mutex<Summary>);

impl HistogramFn for Hist {
    fn record(&self, value: f64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(value);
    }
}

#[derive(Debug, Default)]
struct Registry {
    counters: HashMap<Key, Arc<AtomicU64>>,
    histograms: HashMap<Key, Arc<Hist>>,
}

/// Counters and histograms of this process; gauges are not kept (the
/// library has none).
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorder(Arc<Mutex<Registry>>);

impl Recorder {
    /// A new recorder, installed as the process's global one.
    pub(crate) fn install() -> super::Result<Recorder> {
        let r = Recorder::default();
        metrics::set_global_recorder(r.clone()).map_err(|_| {
            metadatacache::Error::new(
                metadatacache::ErrorKind::Other,
                "a metrics recorder is already installed",
            )
        })?;
        Ok(r)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every metric's value since the process started.
    pub(crate) fn snapshot(&self) -> BTreeMap<MetricKey, Value> {
        let key = |k: &Key| -> MetricKey {
            let mut labels: Vec<(String, String)> = k
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (k.name().to_owned(), labels)
        };
        let reg = self.registry();
        let counters = reg
            .counters
            .iter()
            .map(|(k, c)| (key(k), Value::Counter(c.load(Ordering::Acquire))));
        let histograms = reg.histograms.iter().map(|(k, h)| {
            let s = *h.0.lock().unwrap_or_else(PoisonError::into_inner);
            (key(k), Value::Histogram(s))
        });
        counters.chain(histograms).collect()
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut reg = self.registry();
        let c = reg.counters.entry(key.clone()).or_default();
        Counter::from_arc(Arc::clone(c))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut reg = self.registry();
        let h = reg.histograms.entry(key.clone()).or_default();
        Histogram::from_arc(Arc::clone(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder as _;

    #[test]
    fn counts_and_summarises() {
        let r = Recorder::default();
        let meta = metrics::Metadata::new("t", metrics::Level::INFO, None);
        let key = Key::from_parts("x_total", vec![metrics::Label::new("b", "disk")]);
        r.register_counter(&key, &meta).increment(2);
        r.register_counter(&key, &meta).increment(3);
        let h = Key::from_name("h_seconds");
        r.register_histogram(&h, &meta).record(0.5);
        r.register_histogram(&h, &meta).record(2.0);
        let snap = r.snapshot();
        let k = (
            "x_total".to_owned(),
            vec![("b".to_owned(), "disk".to_owned())],
        );
        assert_eq!(snap[&k], Value::Counter(5));
        let Value::Histogram(s) = snap[&("h_seconds".to_owned(), vec![])] else {
            panic!("a histogram");
        };
        assert_eq!(
            (s.count, s.sum, s.max, s.buckets),
            (2, 2.5, 2.0, [0, 0, 0, 1, 1])
        );
    }
}
