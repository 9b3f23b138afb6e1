//! The structure ARCHITECTURE.md promises, checked from the sources (issue
//! 11): no import circle between the top-level modules of a crate, and no
//! gRPC type in the shard core outside the peer transport (`cluster/`), the
//! gRPC services above the node (`rpc.rs`) and the conversions (`wire.rs`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every `.rs` file under `dir`, but unit-test files.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "tests.rs") {
            out.push(path);
        }
    }
    out
}

/// A file's code without comments and without its `#[cfg(test)]` part.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module a source file belongs to (`None` for the crate root).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_str()?
        .trim_end_matches(".rs")
        .to_owned();
    (first != "lib" && first != "main").then_some(first)
}

/// The crate's modules each file names through `crate::…` paths.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    for part in code.split("crate::").skip(1) {
        if let Some(list) = part.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the first segment of each item
            let (mut depth, mut item_start) = (0, true);
            for (i, ch) in list.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        out.insert(ident(&list[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(part));
        }
    }
    out.remove("self");
    out
}

/// A cycle in `edges`, if any.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == v) {
            let mut cycle = path[at..].to_vec();
            cycle.push(v.to_owned());
            return Some(cycle);
        }
        if done.contains(v) {
            return None;
        }
        path.push(v.to_owned());
        for w in edges.get(v).into_iter().flatten() {
            if let Some(c) = visit(w, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(v.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|v| visit(v, edges, &mut Vec::new(), &mut done))
}

fn module_graph(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(krate).join("src");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src) {
        let Some(module) = module_of(&src, &file) else { continue };
        let deps = imports(&code(&file));
        let entry = edges.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    edges
}

#[test]
fn no_import_circle_between_the_modules_of_a_crate() {
    for krate in ["shard", "feed", "client", "loadgen"] {
        let edges = module_graph(krate);
        assert!(edges.len() > 3, "{krate}: the sources were read ({edges:?})");
        assert_eq!(find_cycle(&edges), None, "{krate}: an import circle");
    }
    // the checker itself finds one
    let mut circle = BTreeMap::new();
    circle.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    circle.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert!(find_cycle(&circle).is_some());
    assert_eq!(
        imports("use crate::{a::b, c, d::{e, f}};\nlet x = crate::g::h();"),
        BTreeSet::from(["a", "c", "d", "g"].map(String::from))
    );
}

#[test]
fn the_shard_core_speaks_the_domain_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("shard/src");
    let allowed = |m: &str| matches!(m, "cluster" | "rpc" | "wire");
    for file in sources(&src) {
        let Some(module) = module_of(&src, &file) else { continue };
        if allowed(&module) {
            continue;
        }
        let code = code(&file);
        for word in ["tonic", "prost", "tickshard_proto"] {
            assert!(
                !code.contains(word),
                "{} uses {word}: gRPC types belong in cluster/, rpc.rs or wire.rs",
                file.display()
            );
        }
    }
}

#[test]
fn the_server_library_carries_neither_the_client_nor_the_load_generator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for krate in ["shard", "feed"] {
        let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).expect("manifest");
        for dep in ["tickshard-client", "tickshard-loadgen", "hdrhistogram", "csv"] {
            assert!(!manifest.contains(dep), "{krate} depends on {dep}");
        }
    }
    // and the client library does not carry the server
    let manifest = std::fs::read_to_string(root.join("client/Cargo.toml")).expect("manifest");
    assert!(
        !manifest.contains("tickshard-feed"),
        "the client library depends on the server"
    );
}
