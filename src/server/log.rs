//! One line per notable event on stderr. Kept trivial on purpose: the server
//! must not depend on a logging framework, and a line is atomic for readers
//! of the log.

use std::fmt::Arguments;
use std::io::Write;

pub fn info(args: Arguments) {
    line("", args);
}

pub fn warn(args: Arguments) {
    line("warning: ", args);
}

fn line(prefix: &str, args: Arguments) {
    // One write per line so lines from several threads never mix.
    let text = format!("coda-server: {prefix}{args}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
