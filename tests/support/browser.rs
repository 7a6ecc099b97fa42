//! A real headless browser for the report tests: Debian's chromium
//! (`SELMA_CHROMIUM` names another binary), run offline on a file:// page;
//! helpers read the DOM it dumps after the load event.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's chromium; `SELMA_CHROMIUM` names another binary.
pub fn chromium() -> PathBuf {
    std::env::var_os("SELMA_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Runs headless chromium on `page` and returns the DOM after the load
/// event (and the inline script) ran.
pub fn dump_dom(page: &Path) -> String {
    let bin = chromium();
    assert!(
        bin.is_file(),
        "{} is missing: install Debian's chromium (`apt-get install -y chromium`) to run \
         the report test; scripts/test.sh installs it",
        bin.display()
    );
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(&bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=5000")
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    // read both pipes on threads so a chatty stderr cannot block chromium
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish within 120 s", bin.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = t_out.join().unwrap().unwrap();
    let stderr = t_err.join().unwrap().unwrap_or_default();
    assert!(
        status.success() && stdout.contains("</html>"),
        "{} failed ({status}); stderr:\n{stderr}",
        bin.display()
    );
    stdout
}

/// The value of `attr="..."` on the first `<body` tag.
pub fn body_attr(dom: &str, attr: &str) -> Option<usize> {
    let body = &dom[dom.find("<body")?..];
    let tag = &body[..body.find('>')?];
    let key = format!("{attr}=\"");
    let v = &tag[tag.find(&key)? + key.len()..];
    v[..v.find('"')?].parse().ok()
}

/// Every URL-bearing attribute value and CSS url() in `dom`.
pub fn references(dom: &str) -> Vec<String> {
    let mut refs = vec![];
    for key in [
        "src=\"",
        "href=\"",
        "srcset=\"",
        "poster=\"",
        "data=\"",
        "url(",
    ] {
        for (i, _) in dom.match_indices(key) {
            let v = &dom[i + key.len()..];
            let end = v.find(['"', ')']).unwrap_or(v.len());
            refs.push(v[..end.min(80)].to_string());
        }
    }
    refs
}
