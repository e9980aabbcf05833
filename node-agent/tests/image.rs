//! The runtime image holds everything the agent runs. Every program the agent's sources start
//! (`Command::new`) must be known here with the Debian package that ships it, and the
//! Dockerfile's runtime stage must install that package; the packages are checked against
//! this Debian machine's own package database. A new `Command::new("x")` fails this test until
//! `x` is added here and to the image. Also checked: the image's default user is not root, the
//! agent's DaemonSet runs it as root and the controller's Deployment as non-root, and the
//! commit reaches a build without `.git`.

use std::path::{Path, PathBuf};

/// The programs the agent starts, and the Debian package of each.
const PROGRAMS: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    // Only to see (and refuse to clean) kube-proxy's iptables-legacy rules, which nft cannot
    // list; the agent looks for it on PATH.
    ("iptables-legacy-save", "iptables"),
    ("ip6tables-legacy-save", "iptables"),
];

/// Files that start a program named by a variable (`Command::new(&argv[0])`), and the
/// program it names in the agent (tests may put a wrapper in front of it).
const INDIRECT: &[(&str, &str)] = &[
    ("nft/exec.rs", "nft"),
    ("nft/session.rs", "nft"),
    ("nft/monitor.rs", "nft"),
    ("migrate/cleanup.rs", "iptables-legacy-save"),
    ("migrate/detect.rs", "iptables-legacy-save"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// What each `Command::new(` in the agent's sources starts: `Ok(program)` for a literal,
/// `Err(file)` for a variable.
fn started_programs() -> Vec<Result<String, String>> {
    let src = root().join("node-agent/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = read(&file);
        let name = file.strip_prefix(&src).unwrap().display().to_string();
        for (at, _) in text.match_indices("Command::new(") {
            let arg = &text[at + "Command::new(".len()..];
            match arg.strip_prefix('"') {
                Some(rest) => found.push(Ok(rest[..rest.find('"').unwrap()].to_owned())),
                None => found.push(Err(name.clone())),
            }
        }
    }
    found
}

/// The runtime stage: everything after the last `FROM`.
fn runtime_stage(dockerfile: &str) -> &str {
    let at = dockerfile
        .match_indices("\nFROM ")
        .last()
        .expect("a multi-stage Dockerfile")
        .0;
    &dockerfile[at..]
}

/// The packages the stage's `apt-get install` commands install.
fn installed_packages(stage: &str) -> Vec<String> {
    let joined = stage.replace("\\\n", " ");
    let mut packages = Vec::new();
    for line in joined
        .lines()
        .filter(|l| l.trim_start().starts_with("RUN "))
    {
        for command in line.split("&&") {
            let words: Vec<&str> = command.split_whitespace().collect();
            if let Some(i) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                packages.extend(
                    words[i + 2..]
                        .iter()
                        .filter(|w| !w.starts_with('-'))
                        .map(|w| w.to_string()),
                );
            }
        }
    }
    packages
}

#[test]
fn every_program_the_agent_starts_is_known_with_its_package() {
    let started = started_programs();
    assert!(
        !started.is_empty(),
        "no Command::new found: is the scan broken?"
    );
    for s in &started {
        match s {
            Ok(program) => assert!(
                PROGRAMS.iter().any(|(p, _)| p == program),
                "the agent starts `{program}`: add it and its Debian package to PROGRAMS here and install the package in deploy/Dockerfile's runtime stage (or stop needing it)"
            ),
            Err(file) => {
                let (_, program) = INDIRECT.iter().find(|(f, _)| f == file).unwrap_or_else(|| {
                    panic!("{file} starts a program named by a variable: add it to INDIRECT here with the program it runs")
                });
                assert!(PROGRAMS.iter().any(|(p, _)| p == program), "{program}");
            }
        }
    }
    // The variable behind the nft files is `nft` from PATH unless a test overrides it.
    assert!(read(&root().join("node-agent/src/nft/exec.rs")).contains(r#"vec!["nft".into()]"#));
    // Node addresses come over netlink: `ip` is not one of the programs.
    assert!(!started.iter().any(|s| s.as_deref() == Ok("ip")));
}

#[test]
fn the_runtime_stage_installs_every_package_the_agent_needs() {
    let dockerfile = read(&root().join("deploy/Dockerfile"));
    let installed = installed_packages(runtime_stage(&dockerfile));
    for (program, package) in PROGRAMS {
        assert!(
            installed.iter().any(|p| p == package),
            "the agent runs `{program}` but the runtime stage does not install `{package}`: {installed:?}"
        );
    }
}

/// The packages named in PROGRAMS are the ones that ship those programs (on this machine,
/// Debian like the image's base).
#[test]
fn each_program_comes_from_the_package_named_for_it() {
    for (program, package) in PROGRAMS {
        let out = std::process::Command::new("dpkg-query")
            .args(["-S", &format!("*bin/{program}")])
            .output()
            .expect("dpkg-query (the test machine is Debian, as the image)");
        let text = String::from_utf8_lossy(&out.stdout);
        let owners: Vec<&str> = text
            .lines()
            .filter(|l| l.ends_with(&format!("bin/{program}")))
            .flat_map(|l| l.split(':').next().unwrap_or_default().split(", "))
            .collect();
        assert!(
            owners.contains(package),
            "`{program}` comes from {owners:?}, not `{package}`"
        );
    }
}

#[test]
fn the_controller_runs_as_non_root_and_the_agent_as_root() {
    let dockerfile = read(&root().join("deploy/Dockerfile"));
    let stage = runtime_stage(&dockerfile);
    assert!(
        stage.lines().any(|l| l.trim() == "USER 65532:65532"),
        "the image's default user must not be root"
    );
    let agent = read(&root().join("deploy/agent.yaml"));
    assert!(
        agent.lines().any(|l| l.trim() == "runAsUser: 0"),
        "the agent needs root for nft: its DaemonSet must say so over the image's USER"
    );
    let controller = read(&root().join("deploy/controller.yaml"));
    assert!(controller.lines().any(|l| l.trim() == "runAsNonRoot: true"));
}

/// `.dockerignore` keeps `.git` out, so the build stage must take the commit as a build
/// argument (proto/build.rs reads it) for `--version` to name it.
#[test]
fn an_image_build_gets_the_commit_without_git() {
    let ignored = read(&root().join(".dockerignore"));
    for entry in ["target", ".git"] {
        assert!(ignored.lines().any(|l| l.trim() == entry), "{entry}");
    }
    let dockerfile = read(&root().join("deploy/Dockerfile"));
    let build = &dockerfile[..dockerfile.len() - runtime_stage(&dockerfile).len()];
    assert!(build.contains("ARG KUBENFT_GIT_COMMIT"), "{build}");
    assert!(read(&root().join("proto/build.rs")).contains(r#"env::var("KUBENFT_GIT_COMMIT")"#));
}

#[test]
fn apt_get_install_lines_are_read_whole() {
    let stage = "\nFROM debian\nRUN apt-get update \\\n && apt-get install -y --no-install-recommends a b \\\n c \\\n && rm -rf x\nRUN true\n";
    assert_eq!(installed_packages(runtime_stage(stage)), ["a", "b", "c"]);
}
