//! The Debian packages, installed into a fresh Debian root: the programs run, every
//! man page renders, the files and conffiles are the ones we mean, remove keeps
//! configuration and state, purge leaves the root as it found it, and lintian finds
//! no errors.
//!
//! This test builds nothing: `packaging/build-debs.sh` writes the packages (CI runs
//! it before the suite). Without them it is skipped with a message saying so. It
//! needs root, `debootstrap` and a Debian mirror ($OVERLAY_DEBIAN_MIRROR, default
//! deb.debian.org), `lintian`, `man` and `systemd-analyze`.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// The packages' version: the workspace's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where `build-debs.sh` (through `cargo deb`) writes the packages.
fn deb_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
    .join("debian")
}

/// `NAME_VERSION-*.deb` in [`deb_dir`], if built.
fn find_deb(name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}_{VERSION}-");
    std::fs::read_dir(deb_dir())
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// A directory removed (with everything below it) on drop.
struct TempRoot(PathBuf);

impl TempRoot {
    fn new() -> Result<TempRoot> {
        let path = std::env::temp_dir().join(format!("overlay-debs-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(TempRoot(path))
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        // debootstrap unmounts what it mounted; never follow a leftover mount.
        for sub in ["proc", "sys", "dev/pts"] {
            let _ = Command::new("umount").arg(self.0.join(sub)).output();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd`, failing with its output unless it succeeds; returns stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dpkg(root: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn in_root(root: &Path, program: &str, args: &[&str]) -> Result<String> {
    run(Command::new("chroot").arg(root).arg(program).args(args))
}

/// Every path below `root`, except the package database, logs and the user
/// database (purge keeps the system user, as Debian packages do).
fn tree(root: &Path) -> Result<BTreeSet<String>> {
    const IGNORED: &[&str] = &[
        "/var/lib/dpkg",
        "/var/log",
        "/var/cache/debconf",
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/.pwd.lock",
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
    ];
    let mut paths = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            let rel = format!("/{}", path.strip_prefix(root)?.display());
            if IGNORED.iter().any(|i| {
                rel == *i || rel.starts_with(&format!("{i}/")) || rel.starts_with(&format!("{i}-"))
            }) {
                continue;
            }
            if path.is_dir() && !path.is_symlink() {
                stack.push(path.clone());
            }
            paths.insert(rel);
        }
    }
    Ok(paths)
}

fn mirror() -> String {
    std::env::var("OVERLAY_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

#[test]
fn debs_install_run_and_purge_cleanly_in_a_fresh_debian_root() {
    let (Some(node_deb), Some(coord_deb)) = (find_deb("overlay"), find_deb("overlay-coord")) else {
        eprintln!(
            "SKIPPED: no overlay_{VERSION}-*.deb and overlay-coord_{VERSION}-*.deb in {}; \
             build them with packaging/build-debs.sh (CI does, in .ci/run)",
            deb_dir().display()
        );
        return;
    };
    if let Err(e) = check_debs(&node_deb, &coord_deb) {
        panic!("{e:#}");
    }
}

fn check_debs(node_deb: &Path, coord_deb: &Path) -> Result<()> {
    ensure!(
        nix_is_root(),
        "installing packages into a Debian root needs root; run: sudo tests/run.sh debs"
    );
    lintian_finds_no_errors(&[node_deb, coord_deb])?;

    let root = TempRoot::new()?;
    let root = root.0.as_path();
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(root)
        .arg(mirror()))
    .context("debootstrap (needs the debootstrap package and a reachable Debian mirror)")?;
    let before = tree(root)?;

    dpkg(
        root,
        &[
            "--install",
            &node_deb.to_string_lossy(),
            &coord_deb.to_string_lossy(),
        ],
    )?;

    programs_run(root)?;
    files_and_conffiles_are_ours(root)?;
    every_man_page_renders(root)?;
    help_and_man_page_agree(root)?;
    units_verify(root)?;
    coordinator_user_and_state(root)?;

    // State the services would have made: remove keeps it, purge deletes it.
    std::fs::create_dir_all(root.join("var/lib/overlay"))?;
    std::fs::write(root.join("var/lib/overlay/node.key"), "key")?;
    std::fs::write(root.join("var/lib/overlay-coord/coord.db"), "db")?;
    dpkg(root, &["--remove", "overlay", "overlay-coord"])?;
    ensure!(
        !root.join("usr/bin/overlayd").exists(),
        "remove left overlayd"
    );
    for kept in [
        "etc/overlay/overlayd.toml",
        "etc/overlay/coord.toml",
        "var/lib/overlay/node.key",
        "var/lib/overlay-coord/coord.db",
    ] {
        ensure!(root.join(kept).exists(), "remove deleted /{kept}");
    }
    dpkg(root, &["--purge", "overlay", "overlay-coord"])?;
    let after = tree(root)?;
    let left: Vec<_> = after.difference(&before).collect();
    let taken: Vec<_> = before.difference(&after).collect();
    ensure!(left.is_empty(), "purge left behind: {left:?}");
    ensure!(taken.is_empty(), "install and purge removed: {taken:?}");
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn lintian_finds_no_errors(debs: &[&Path]) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .args(debs)
        .output()
        .context("running lintian (install the lintian package)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    ensure!(
        out.status.success() && errors.is_empty(),
        "lintian errors:\n{}\n{}",
        errors.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn programs_run(root: &Path) -> Result<()> {
    let version = in_root(root, "/usr/bin/overlayd", &["--version"])?;
    ensure!(
        version.trim() == format!("overlayd {VERSION}"),
        "overlayd --version says {version:?}"
    );
    let help = in_root(root, "/usr/bin/overlayctl", &["--help"])?;
    ensure!(help.contains("peers"), "overlayctl --help: {help}");
    let version = in_root(root, "/usr/bin/overlay-coord", &["--version"])?;
    ensure!(
        version.trim() == format!("overlay-coord {VERSION}"),
        "overlay-coord --version says {version:?}"
    );
    Ok(())
}

fn listed(root: &Path, package: &str) -> Result<BTreeSet<String>> {
    Ok(dpkg(root, &["--listfiles", package])?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn files_and_conffiles_are_ours(root: &Path) -> Result<()> {
    let node = listed(root, "overlay")?;
    for file in [
        "/usr/bin/overlayd",
        "/usr/bin/overlayctl",
        "/usr/lib/systemd/system/overlayd.service",
        "/etc/overlay/overlayd.toml",
        "/usr/share/man/man1/overlayd.1.gz",
        "/usr/share/man/man1/overlayd-up.1.gz",
        "/usr/share/man/man1/overlayctl.1.gz",
        "/usr/share/man/man1/overlayctl-ping.1.gz",
        "/usr/share/bash-completion/completions/overlayd",
        "/usr/share/bash-completion/completions/overlayctl",
        "/usr/share/zsh/vendor-completions/_overlayd",
        "/usr/share/zsh/vendor-completions/_overlayctl",
        "/usr/share/fish/vendor_completions.d/overlayd.fish",
        "/usr/share/fish/vendor_completions.d/overlayctl.fish",
        "/usr/share/doc/overlay/copyright",
    ] {
        ensure!(node.contains(file), "overlay lacks {file}");
        ensure!(root.join(&file[1..]).exists(), "{file} is not installed");
    }
    let coord = listed(root, "overlay-coord")?;
    for file in [
        "/usr/bin/overlay-coord",
        "/usr/lib/systemd/system/overlay-coord.service",
        "/etc/overlay/coord.toml",
        "/usr/share/man/man1/overlay-coord.1.gz",
        "/usr/share/man/man1/overlay-coord-serve.1.gz",
        "/usr/share/man/man1/overlay-coord-keys-create.1.gz",
        "/usr/share/bash-completion/completions/overlay-coord",
        "/usr/share/zsh/vendor-completions/_overlay-coord",
        "/usr/share/fish/vendor_completions.d/overlay-coord.fish",
    ] {
        ensure!(coord.contains(file), "overlay-coord lacks {file}");
    }
    let shared: Vec<_> = node
        .intersection(&coord)
        .filter(|f| !root.join(&f[1..]).is_dir())
        .collect();
    ensure!(shared.is_empty(), "both packages ship {shared:?}");

    for (package, conffile) in [
        ("overlay", "/etc/overlay/overlayd.toml"),
        ("overlay-coord", "/etc/overlay/coord.toml"),
    ] {
        let conffiles = run(Command::new("dpkg-query")
            .arg(format!("--root={}", root.display()))
            .args(["--showformat=${Conffiles}", "--show", package]))?;
        let names: Vec<&str> = conffiles
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        ensure!(names == [conffile], "{package}'s conffiles: {names:?}");
        // Every setting commented: an installed package changes nothing by itself.
        // (An empty table header such as `[turn]` sets nothing.)
        let text = std::fs::read_to_string(root.join(&conffile[1..]))?;
        let active: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
            .collect();
        ensure!(active.is_empty(), "{conffile} sets {active:?}");
    }
    Ok(())
}

fn man_pages(root: &Path) -> Result<Vec<PathBuf>> {
    let mut pages = Vec::new();
    for package in ["overlay", "overlay-coord"] {
        pages.extend(
            listed(root, package)?
                .into_iter()
                .filter(|f| f.starts_with("/usr/share/man/man1/") && f.ends_with(".1.gz"))
                .map(|f| root.join(&f[1..])),
        );
    }
    Ok(pages)
}

fn render_man(page: &Path) -> Result<String> {
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .context("running man (install man-db)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && err.trim().is_empty(),
        "man -l {} failed ({}): {err}",
        page.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn every_man_page_renders(root: &Path) -> Result<()> {
    let pages = man_pages(root)?;
    // overlayd, up; overlayctl and its six commands; overlay-coord and its commands.
    ensure!(
        pages.len() >= 12,
        "only {} man pages: {pages:?}",
        pages.len()
    );
    for page in &pages {
        let text = render_man(page)?;
        ensure!(
            text.contains("NAME"),
            "{} has no NAME section",
            page.display()
        );
    }
    Ok(())
}

/// Both come from the same clap definition; a hand-written page would drift.
fn help_and_man_page_agree(root: &Path) -> Result<()> {
    let help = in_root(root, "/usr/bin/overlayd", &["up", "--help"])?;
    let page = render_man(&root.join("usr/share/man/man1/overlayd-up.1.gz"))?;
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .collect();
    ensure!(flags.len() >= 8, "overlayd up --help lists {flags:?}");
    for flag in flags {
        ensure!(page.contains(flag), "overlayd-up(1) lacks {flag}");
    }
    let about = help.lines().next().unwrap_or_default().trim();
    ensure!(page.contains(about), "overlayd-up(1) lacks {about:?}");
    Ok(())
}

/// `systemd-analyze verify` on the installed units. The minimal root has no
/// systemd, so each unit is checked on the host with its `ExecStart` pointed at
/// the binary installed in the root (what verify checks is executable).
fn units_verify(root: &Path) -> Result<()> {
    let dir = root.join("tmp/units");
    std::fs::create_dir_all(&dir)?;
    for unit in ["overlayd.service", "overlay-coord.service"] {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit))?;
        let text = text.replace(
            "ExecStart=/usr/bin/",
            &format!("ExecStart={}/usr/bin/", root.display()),
        );
        let path = dir.join(unit);
        std::fs::write(&path, text)?;
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .context("running systemd-analyze (install systemd)")?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify {unit}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn coordinator_user_and_state(root: &Path) -> Result<()> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))?;
    let Some(user) = passwd.lines().find(|l| l.starts_with("overlay-coord:")) else {
        bail!("postinst created no overlay-coord user");
    };
    let uid: u32 = user.split(':').nth(2).context("uid")?.parse()?;
    ensure!(uid < 1000, "overlay-coord is not a system user: {user}");
    ensure!(
        user.ends_with(":/usr/sbin/nologin"),
        "overlay-coord can log in: {user}"
    );
    let state = std::fs::metadata(root.join("var/lib/overlay-coord"))?;
    ensure!(
        state.uid() == uid,
        "/var/lib/overlay-coord is not the server's"
    );
    ensure!(
        state.permissions().mode() & 0o777 == 0o700,
        "/var/lib/overlay-coord mode"
    );
    let config = std::fs::metadata(root.join("etc/overlay/coord.toml"))?;
    ensure!(
        config.permissions().mode() & 0o777 == 0o640 && config.uid() == 0,
        "coord.toml should be root:overlay-coord 0640"
    );
    // Never started: no unit is enabled by the packages.
    ensure!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/overlayd.service")
            .exists()
            && !root
                .join("etc/systemd/system/multi-user.target.wants/overlay-coord.service")
                .exists(),
        "a package enabled its service"
    );
    Ok(())
}
