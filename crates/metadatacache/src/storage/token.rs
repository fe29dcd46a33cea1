//! Write tokens: identifiers unique to one write.

/// A new [`UploadRequest::write_token`](super::UploadRequest::write_token): 32 hex digits, unique to this
/// call across threads, processes and machines.
///
/// The first 64 bits are drawn from the operating system's random source
/// once per process, and again in a child after `fork` (a child gets a copy
/// of its parent's memory, so a generator seeded before the fork would
/// repeat the parent's tokens there); the last 64 bits count the calls.
pub fn new_write_token() -> String {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    // (process id, random bits of that process).
    static SEED: Mutex<(u32, u64)> = Mutex::new((0, 0));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let seed = {
        let mut seed = SEED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seed.0 != pid {
            // Without an OS random source, the time and the process id
            // still set processes apart.
            let random = getrandom::u64().unwrap_or_else(|_| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                (nanos as u64) ^ (u64::from(pid) << 32)
            });
            *seed = (pid, random);
        }
        seed.1
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut out = String::with_capacity(32);
    push_hex(&mut out, seed);
    push_hex(&mut out, n);
    out
}

/// Appends `v` as 16 lowercase hex digits.
fn push_hex(out: &mut String, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for i in (0..16).rev() {
        out.push(char::from(DIGITS[((v >> (4 * i)) & 0xf) as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_tokens_differ() {
        let a = new_write_token();
        let b = new_write_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16], "one seed per process");
    }
}
