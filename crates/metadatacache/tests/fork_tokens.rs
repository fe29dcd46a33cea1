//! Write tokens stay unique in a child forked after the parent drew some: a
//! child gets a copy of its parent's memory, so a generator seeded before
//! the fork would hand both the same tokens.
//!
//! Its own test binary without the test harness, so that the process is
//! single-threaded when it forks.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::fd::FromRawFd;

use metadatacache::new_write_token;

fn main() {
    // The parent draws first, so whatever state the generator keeps is set
    // up before the fork.
    let before = new_write_token();
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the process is single-threaded here (no test harness).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the write end, owned by this process from here on.
        let mut out = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        let tokens: Vec<String> = (0..3).map(|_| new_write_token()).collect();
        out.write_all(tokens.join("\n").as_bytes()).unwrap();
        drop(out);
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the write end belongs to the child; the read end to us.
    unsafe { libc::close(fds[1]) };
    let mut from_child = String::new();
    // SAFETY: the read end, owned by this process from here on.
    unsafe { std::fs::File::from_raw_fd(fds[0]) }
        .read_to_string(&mut from_child)
        .unwrap();
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let ours: Vec<String> = (0..3).map(|_| new_write_token()).collect();
    let theirs: Vec<&str> = from_child.lines().collect();
    assert_eq!(theirs.len(), 3, "the child's tokens: {from_child:?}");
    for t in &theirs {
        assert!(
            !ours.iter().any(|o| o == t) && *t != before,
            "the child repeated a token of its parent: {t}"
        );
        assert_ne!(t[..16], before[..16], "the child kept its parent's seed");
    }
    println!("fork_tokens: parent {ours:?}, child {theirs:?}: all distinct");
}
