//! `overlay-coord policy …`: check, set, get, clear and explain the access
//! policy in the store (`crate::policy` does the work).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::cli::PolicyCommand;
use crate::policy::{self, Checked, NodeDesc};
use crate::store::Store;

/// The enrolled nodes as the policy sees them.
pub fn nodes(store: &Store) -> Result<Vec<NodeDesc>> {
    Ok(store
        .list_nodes()?
        .into_iter()
        .map(|n| NodeDesc {
            id: n.id,
            name: n.name,
            ip: n.mesh_ip,
            tags: n.tags,
        })
        .collect())
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// Parses, compiles and tests `file`; warnings go to stderr.
fn check(store: &Store, file: &Path) -> Result<(String, Checked)> {
    let text = read(file)?;
    let checked = policy::check(&file.display().to_string(), &text, &nodes(store)?)?;
    for w in &checked.warnings {
        eprintln!("{w}");
    }
    Ok((text, checked))
}

pub fn run(store: &Store, command: &PolicyCommand, out: &mut impl Write) -> Result<()> {
    match command {
        PolicyCommand::Check { file } => {
            let (_, checked) = check(store, file)?;
            writeln!(out, "{}", checked.summary())?;
        }
        PolicyCommand::Set { file } => {
            let (text, checked) = check(store, file)?;
            store.set_policy(&text)?;
            writeln!(out, "{}; policy set", checked.summary())?;
        }
        PolicyCommand::Get => match store.policy()? {
            Some(p) => out.write_all(p.text.as_bytes())?,
            None => eprintln!("no policy is set: every node may reach every other"),
        },
        PolicyCommand::Clear => {
            if store.clear_policy()? {
                eprintln!("policy cleared: every node may reach every other");
            } else {
                eprintln!("no policy was set");
            }
        }
        PolicyCommand::Explain { src, dst, port } => {
            let Some(stored) = store.policy()? else {
                writeln!(out, "allowed: no policy is set")?;
                return Ok(());
            };
            let parsed = match policy::parse("stored policy", &stored.text) {
                Ok(p) => p,
                Err(e) => bail!("the stored policy no longer parses: {e}"),
            };
            let line = policy::explain(Arc::new(parsed), &nodes(store)?, src, dst, port)?;
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
