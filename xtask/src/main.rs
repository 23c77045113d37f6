//! `cargo run --bin xtask -- docs OUT`: writes the man pages and shell completions
//! of `overlayd`, `overlayctl` and `overlay-coord` under `OUT/man` and
//! `OUT/completions/{bash,zsh,fish}`, from the very clap definitions the binaries
//! parse, so `--help` and `man` can never disagree. `packaging/build-debs.sh` runs
//! it before `cargo deb`; the packages install what it writes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.as_slice() {
        [task, out] if task == "docs" => PathBuf::from(out),
        _ => bail!("usage: xtask docs OUT_DIR"),
    };
    for cmd in programs() {
        write_docs(cmd, &out)?;
    }
    Ok(())
}

/// Every packaged program's command line.
fn programs() -> [clap::Command; 3] {
    [
        overlayd::cli::Cli::command(),
        overlayctl::cli::Cli::command(),
        overlay_coord::cli::Cli::command(),
    ]
}

fn write_docs(cmd: clap::Command, out: &Path) -> Result<()> {
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let mut cmd = cmd;
    // Propagates global flags and version into the subcommands before they are
    // rendered on their own pages.
    cmd.build();
    write_man_pages(&cmd, cmd.get_name(), &man_dir)?;

    let name = cmd.get_name().to_string();
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(file);
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut f);
        f.flush()?;
    }
    Ok(())
}

/// `NAME.1` for the program and `NAME-SUB[-SUB…].1` for each subcommand, the
/// names `git` and `cargo` use, so `man overlayctl-ping` finds the page.
fn write_man_pages(cmd: &clap::Command, page: &str, dir: &Path) -> Result<()> {
    let path = dir.join(format!("{page}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .with_context(|| format!("rendering {page}"))?;
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_man_pages(sub, &format!("{page}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
