//! What a replica tells the parent: one line per event on its standard
//! output, written and read only here.
//!
//! | line                  | meaning                                                  |
//! |-----------------------|----------------------------------------------------------|
//! | `S k`                 | an update of key `k` starts                              |
//! | `A k`                 | it returned `Ok`: applied exactly once                   |
//! | `U k`                 | it returned `Unavailable`: maybe applied, at most once   |
//! | `G k message`         | it gave up after conflicts: not applied                  |
//! | `E k Kind message`    | it failed with another error of kind `Kind`: not applied |
//! | `T conflicts retries give-ups uploads` | the replica's store statistics so far   |
//! | `C name value labels`  | a counter of the replica's metrics so far (`--metrics`)  |
//! | `H name count sum max b1 … b5 labels` | a histogram so far: count, sum, maximum and the counts of its [buckets](super::metrics_report::BOUNDS) |
//!
//! `Kind` is the name of the `ErrorKind` variant (`Other`, `Codec`, …);
//! `message` is the error's one-line text, to the end of the line. Metric
//! `labels` are `key=value` words; in names, keys and values a space, `%`,
//! `=` or control character is written `%XX`. Numbers are written so that
//! they read back exactly. Every `T`, `C` and `H` line carries a value
//! since the replica process started, so the last one counts.

use std::fmt;

use metadatacache::{Error, ErrorKind};

use super::metrics_report::{MetricKey, Summary, Value};

/// One line of a replica's report.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Report {
    Start(usize),
    Acked(usize),
    Unavailable(usize),
    GaveUp {
        key: usize,
        message: String,
    },
    Failed {
        key: usize,
        kind: String,
        message: String,
    },
    Stats {
        conflicts: u64,
        retries: u64,
        give_ups: u64,
        uploads: u64,
    },
    Metric(MetricKey, Value),
}

impl Report {
    /// The outcome of one `Store::update` of `key`.
    pub(super) fn outcome(key: usize, res: &Result<(), Error>) -> Report {
        match res {
            Ok(()) => Report::Acked(key),
            Err(e) if e.kind() == ErrorKind::Unavailable => Report::Unavailable(key),
            // An update returns a conflict only when it has run out of
            // attempts (its closure never fails).
            Err(e) if e.is_conflict() => Report::GaveUp {
                key,
                message: one_line(e),
            },
            Err(e) => Report::Failed {
                key,
                kind: format!("{:?}", e.kind()),
                message: one_line(e),
            },
        }
    }

    /// Reads a line; `None` when it is not one of the lines above.
    pub(super) fn parse(line: &str) -> Option<Report> {
        let (tag, rest) = line.split_once(' ')?;
        let key_and_rest = |rest: &str| -> Option<(usize, String)> {
            let (key, text) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((key.parse().ok()?, text.to_owned()))
        };
        let key = |rest: &str| rest.parse::<usize>().ok();
        Some(match tag {
            "S" => Report::Start(key(rest)?),
            "A" => Report::Acked(key(rest)?),
            "U" => Report::Unavailable(key(rest)?),
            "G" => {
                let (key, message) = key_and_rest(rest)?;
                Report::GaveUp { key, message }
            }
            "E" => {
                let (key, rest) = key_and_rest(rest)?;
                let (kind, message) = rest.split_once(' ').unwrap_or((&rest, ""));
                if kind.is_empty() {
                    return None;
                }
                Report::Failed {
                    key,
                    kind: kind.to_owned(),
                    message: message.to_owned(),
                }
            }
            "T" => {
                let nums: Vec<u64> = rest
                    .split(' ')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .ok()?;
                let [conflicts, retries, give_ups, uploads] = nums[..] else {
                    return None;
                };
                Report::Stats {
                    conflicts,
                    retries,
                    give_ups,
                    uploads,
                }
            }
            "C" | "H" => parse_metric(tag, rest)?,
            _ => return None,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Start(k) => write!(f, "S {k}"),
            Report::Acked(k) => write!(f, "A {k}"),
            Report::Unavailable(k) => write!(f, "U {k}"),
            Report::GaveUp { key, message } => write!(f, "G {key} {message}"),
            Report::Failed { key, kind, message } => write!(f, "E {key} {kind} {message}"),
            Report::Stats {
                conflicts,
                retries,
                give_ups,
                uploads,
            } => write!(f, "T {conflicts} {retries} {give_ups} {uploads}"),
            Report::Metric((name, labels), value) => {
                match value {
                    Value::Counter(n) => write!(f, "C {} {n}", escape(name))?,
                    Value::Histogram(s) => {
                        write!(f, "H {} {} {:?} {:?}", escape(name), s.count, s.sum, s.max)?;
                        for b in s.buckets {
                            write!(f, " {b}")?;
                        }
                    }
                }
                for (k, v) in labels {
                    write!(f, " {}={}", escape(k), escape(v))?;
                }
                Ok(())
            }
        }
    }
}

/// Reads the rest of a `C` or `H` line.
fn parse_metric(tag: &str, rest: &str) -> Option<Report> {
    let mut words = rest.split(' ');
    let name = unescape(words.next()?).filter(|n| !n.is_empty())?;
    let value = if tag == "C" {
        Value::Counter(words.next()?.parse().ok()?)
    } else {
        let mut s = Summary {
            count: words.next()?.parse().ok()?,
            sum: words.next()?.parse().ok()?,
            max: words.next()?.parse().ok()?,
            ..Summary::default()
        };
        for b in &mut s.buckets {
            *b = words.next()?.parse().ok()?;
        }
        Value::Histogram(s)
    };
    let labels = words
        .map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((unescape(k)?, unescape(v)?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Report::Metric((name, labels), value))
}

/// A name, label key or value as one word without `=`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ' ' || c == '%' || c == '=' || c.is_control() {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// An error's text on one line, whatever it contains.
fn one_line(e: &Error) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_report_reads_back() {
        let reports = [
            Report::Start(3),
            Report::Acked(0),
            Report::Unavailable(12),
            Report::GaveUp {
                key: 1,
                message: "update of key 1 gave up after 2 attempts; last conflict: x".into(),
            },
            Report::Failed {
                key: 2,
                kind: "Other".into(),
                message: "disk: torture/key-2.json: injected: storage error".into(),
            },
            Report::Stats {
                conflicts: 5,
                retries: 4,
                give_ups: 1,
                uploads: 17,
            },
            Report::Metric(
                (
                    "metadatacache_uploads_total".into(),
                    vec![("backend".into(), "disk".into())],
                ),
                Value::Counter(u64::MAX),
            ),
            Report::Metric(
                (
                    "metadatacache_operation_seconds".into(),
                    vec![
                        ("op".into(), "update".into()),
                        ("outcome".into(), "precondition failed".into()),
                        ("odd %=".into(), "a\nb=c".into()),
                    ],
                ),
                Value::Histogram(Summary {
                    count: 3,
                    sum: 0.1 + 0.2 + 1e-9,
                    max: 0.2,
                    buckets: [0, 1, 0, 2, 0],
                }),
            ),
            Report::Metric(("no_labels_total".into(), vec![]), Value::Counter(0)),
        ];
        for r in reports {
            assert_eq!(Report::parse(&r.to_string()), Some(r.clone()), "{r}");
        }
    }

    #[test]
    fn outcomes_are_classified_by_the_promise() {
        let ok = Report::outcome(1, &Ok(()));
        assert_eq!(ok, Report::Acked(1));
        let maybe = Report::outcome(1, &Err(Error::unavailable("timeout")));
        assert_eq!(maybe, Report::Unavailable(1));
        let conflict = Error::new(ErrorKind::PreconditionFailed, "gave up\nafter 2");
        let Report::GaveUp { message, .. } = Report::outcome(1, &Err(conflict)) else {
            panic!("a conflict is a give-up");
        };
        assert!(!message.contains('\n'), "{message}");
        let failed = Report::outcome(1, &Err(Error::new(ErrorKind::Codec, "bad")));
        assert!(
            matches!(&failed, Report::Failed { kind, .. } if kind == "Codec"),
            "{failed:?}"
        );
    }

    #[test]
    fn garbage_is_not_a_report() {
        for line in [
            "",
            "S",
            "S x",
            "A 1 2",
            "E 1",
            "T 1 2",
            "T 1 2 x",
            "T 1 2 3 x",
            "Z 1",
            "EOF",
            "C",
            "C name",
            "C name x",
            "C name 1 nolabel",
            "C name 1 a=%G0",
            "H name 1 0.5 0.5",
            "H name 1 0.5 0.5 1 0 0 0 x",
        ] {
            assert_eq!(Report::parse(line), None, "{line:?}");
        }
    }
}
