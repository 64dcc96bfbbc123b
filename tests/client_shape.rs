//! The client core's shape (issue 10), checked so it does not drift back:
//! no import cycle among the modules of `src/client`, and every `impl` of
//! `Inner` in `inner.rs` (docs/CLIENT.md "Modules"). Read from the source:
//! a module names another with `super::name`, `super::{name, ...}` or
//! `crate::client::name` (from `conn/`, `super::super::name`), or with a
//! name `mod.rs` re-exports (`super::Client` is `api`'s); test modules are
//! left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/client")
}

/// Every `.rs` file of `src/client` and its subdirectories, with the
/// top-level module it belongs to (`conn/session.rs` → `conn`).
fn sources() -> Vec<(String, PathBuf, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(client_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let top = p.file_name().unwrap().to_string_lossy().to_string();
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_some_and(|x| x == "rs") {
                    out.push((top.clone(), f, true));
                }
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            let stem = p.file_stem().unwrap().to_string_lossy().to_string();
            out.push((stem, p, false));
        }
    }
    out
}

/// The code of a file without its test module and its comments (a doc
/// link to `crate::client::Client` is not an import).
fn code(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap();
    let s = match s.find("#[cfg(test)]\nmod tests") {
        Some(i) => &s[..i],
        None => &s[..],
    };
    s.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first path segment of each item of a `{a, b::c, D}` group.
fn group_heads(s: &str) -> Vec<String> {
    let mut depth = 0;
    let mut item_start = true;
    let mut out = Vec::new();
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                item_start = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => item_start = true,
            c if item_start && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                out.push(ident_at(&s[i..]).to_string());
                item_start = false;
            }
            _ => {}
        }
    }
    out
}

/// The top-level modules `text` names, by the prefixes that reach them.
fn named(text: &str, prefixes: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for p in prefixes {
        let mut rest = text;
        while let Some(i) = rest.find(p) {
            // `super::super::x` seen as `super::` is handled by its own
            // prefix: skip a match that is the tail of a longer one.
            let before = &rest[..i];
            let after = &rest[i + p.len()..];
            rest = after;
            if *p == "super::" && (before.ends_with("super::") || after.starts_with("super::")) {
                continue;
            }
            if after.starts_with('{') {
                out.extend(group_heads(after));
            } else {
                out.push(ident_at(after).to_string());
            }
        }
    }
    out
}

/// The names `mod.rs` re-exports (`pub use api::{Client, ...}`), each with
/// the module that defines it: `super::Client` names `api`.
fn reexports() -> BTreeMap<String, String> {
    let text = code(&client_dir().join("mod.rs"));
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        if module == "crate" {
            continue;
        }
        let names = names.trim_end_matches(';');
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for n in names.split(',') {
            let n = n.trim();
            if !n.is_empty() {
                out.insert(n.to_string(), module.to_string());
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let srcs = sources();
    let modules: BTreeSet<String> = srcs
        .iter()
        .map(|(m, _, _)| m.clone())
        .filter(|m| m != "mod")
        .collect();
    let reexported = reexports();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, path, nested) in &srcs {
        if m == "mod" {
            continue;
        }
        let text = code(path);
        let prefixes: &[&str] = if *nested {
            &["super::super::", "crate::client::"]
        } else {
            &["super::", "crate::client::"]
        };
        let deps = g.entry(m.clone()).or_default();
        for d in named(&text, prefixes) {
            // A name `mod.rs` re-exports stands for its module.
            let d = reexported.get(&d).cloned().unwrap_or(d);
            if d != *m && modules.contains(&d) {
                deps.insert(d);
            }
        }
    }
    g
}

/// One cycle through `from`, if any.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        for d in g.get(at).into_iter().flatten() {
            if let Some(i) = path.iter().position(|p| p == d) {
                let mut c = path[i..].to_vec();
                c.push(d.clone());
                return Some(c);
            }
            if done.insert(d.clone()) {
                path.push(d.clone());
                if let Some(c) = walk(g, d, path, done) {
                    return Some(c);
                }
                path.pop();
            }
        }
        None
    }
    walk(g, from, &mut vec![from.to_string()], &mut BTreeSet::new())
}

#[test]
fn no_module_of_the_client_imports_one_that_imports_it_back() {
    let g = graph();
    assert!(g.len() > 20, "found too few modules: {:?}", g.keys());
    // The parser finds what it must: known edges.
    assert!(g["cml"].contains("cache"), "{:?}", g["cml"]);
    assert!(g["inner"].contains("reintegrate"), "{:?}", g["inner"]);
    assert!(g["conn"].contains("callback"), "{:?}", g["conn"]);
    // Through a re-export: `use super::{Client, FileType}` names `api`.
    assert!(g["acl"].contains("api"), "{:?}", g["acl"]);
    for m in g.keys() {
        if let Some(c) = cycle(&g, m) {
            panic!("an import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn every_impl_of_inner_is_in_inner_rs() {
    for (_, path, _) in sources() {
        if path.file_name().unwrap() == "inner.rs" {
            continue;
        }
        for (n, line) in code(&path).lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("impl Inner") || (l.starts_with("impl ") && l.contains(" for Inner")) {
                panic!("{}:{}: {line}", path.display(), n + 1);
            }
        }
    }
}

#[test]
fn the_group_parser_takes_the_first_segment_of_each_item() {
    assert_eq!(
        group_heads("{a, b::c, D, e::{f, g}}; rest"),
        ["a", "b", "D", "e"]
    );
    assert_eq!(
        named("use super::{x, y};\nuse super::z::W;", &["super::"]),
        ["x", "y", "z"]
    );
}
