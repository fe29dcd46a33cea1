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
//! | `T conflicts retries give-ups` | the replica's store statistics so far           |
//!
//! `Kind` is the name of the `ErrorKind` variant (`Other`, `Codec`, …);
//! `message` is the error's one-line text, to the end of the line.

use std::fmt;

use metadatacache::{Error, ErrorKind};

/// One line of a replica's report.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    },
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
                let [conflicts, retries, give_ups] = nums[..] else {
                    return None;
                };
                Report::Stats {
                    conflicts,
                    retries,
                    give_ups,
                }
            }
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
            } => write!(f, "T {conflicts} {retries} {give_ups}"),
        }
    }
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
            },
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
            "", "S", "S x", "A 1 2", "E 1", "T 1 2", "T 1 2 x", "Z 1", "EOF",
        ] {
            assert_eq!(Report::parse(line), None, "{line:?}");
        }
    }
}
