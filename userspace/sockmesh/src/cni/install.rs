//! `sockmesh install-cni`: put the plugin binary into the node's CNI bin folder and chain
//! sockmesh into the node's active CNI configuration (the file a runtime reads first), as
//! istio-cni's installer does. `--watch` keeps it there when the primary CNI rewrites its file;
//! `--uninstall` takes it out again.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// The node's CNI configuration folder (as mounted in the installer's container).
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node's CNI plugin folder.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The agent's socket as seen on the node (where the runtime runs the plugin).
    #[arg(long, default_value = "/run/sockmesh/agent.sock")]
    pub agent_socket: PathBuf,
    /// Kubernetes namespaces never captured (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub exclude_namespaces: Vec<String>,
    /// Keep running, and chain sockmesh in again whenever the configuration changes.
    #[arg(long)]
    pub watch: bool,
    /// Remove sockmesh from the configuration and the binary from the plugin folder.
    #[arg(long, conflicts_with = "watch")]
    pub uninstall: bool,
}

/// sockmesh's entry in a plugin list.
pub fn plugin_entry(args: &InstallArgs) -> Value {
    json!({
        "type": "sockmesh",
        "agent_socket": args.agent_socket,
        "exclude_namespaces": args.exclude_namespaces,
        "capabilities": { super::plugin::ANNOTATIONS_CAPABILITY: true },
    })
}

/// The configuration file a runtime uses: the first `.conf`, `.conflist` or `.json` by name.
pub fn active_config(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// `config` with sockmesh last in its plugin list (replacing an older sockmesh entry); a
/// single-plugin `.conf` becomes a list. Returns None when nothing changes.
pub fn chained(config: &Value, entry: &Value) -> anyhow::Result<Option<Value>> {
    let mut list = if config.get("plugins").is_some() {
        config.clone()
    } else if config.get("type").is_some() {
        let mut single = config.clone();
        let o = single
            .as_object_mut()
            .context("configuration is not an object")?;
        let version = o.remove("cniVersion").unwrap_or(json!("1.0.0"));
        let name = o.remove("name").unwrap_or(json!("k8s-pod-network"));
        json!({ "cniVersion": version, "name": name, "plugins": [single] })
    } else {
        bail!("neither a plugin list (\"plugins\") nor a plugin (\"type\")");
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .context("\"plugins\" is not a list")?;
    if plugins.first().is_some_and(|p| p["type"] == "sockmesh") && plugins.len() == 1 {
        bail!("sockmesh is the only plugin: it chains after the plugin that sets up the pod's interface");
    }
    let had = plugins.iter().position(|p| p["type"] == "sockmesh");
    if let Some(i) = had {
        if plugins[i] == *entry && i == plugins.len() - 1 && config.get("plugins").is_some() {
            return Ok(None);
        }
        plugins.remove(i);
    }
    plugins.push(entry.clone());
    Ok(Some(list))
}

/// `config` without sockmesh, or None when it has no sockmesh entry.
pub fn unchained(config: &Value) -> Option<Value> {
    let mut list = config.clone();
    let plugins = list.get_mut("plugins")?.as_array_mut()?;
    let before = plugins.len();
    plugins.retain(|p| p["type"] != "sockmesh");
    (plugins.len() != before).then_some(list)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("sockmesh-tmp{}", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// Whether two files hold the same bytes, compared a block at a time: the binary is tens of
/// megabytes and the installer's container has a small memory limit.
fn same_contents(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::BufRead;
    let (fa, fb) = (fs::File::open(a)?, fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ra = std::io::BufReader::with_capacity(64 << 10, fa);
    let mut rb = std::io::BufReader::with_capacity(64 << 10, fb);
    loop {
        let (ba, bb) = (ra.fill_buf()?, rb.fill_buf()?);
        let n = ba.len().min(bb.len());
        if n == 0 {
            return Ok(ba.len() == bb.len());
        }
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        ra.consume(n);
        rb.consume(n);
    }
}

/// Copy `src` to `dst` through a temporary file and a rename, streamed.
fn copy_atomically(src: &Path, dst: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dst.with_extension(format!("sockmesh-tmp{}", std::process::id()));
    let mut from = fs::File::open(src).with_context(|| format!("reading {}", src.display()))?;
    let mut to = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::io::copy(&mut from, &mut to).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, dst).with_context(|| format!("renaming into {}", dst.display()))
}

/// One pass: binary in place, sockmesh chained into the active configuration. Returns what
/// it did, for the log.
pub fn install_once(args: &InstallArgs) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let bin = args.cni_bin_dir.join("sockmesh");
    if !same_contents(&exe, &bin).unwrap_or(false) {
        copy_atomically(&exe, &bin, 0o755)?;
    }
    let Some(path) = active_config(&args.cni_conf_dir)? else {
        bail!(
            "no CNI configuration in {}: install the cluster's network plugin first (sockmesh \
             chains after it)",
            args.cni_conf_dir.display()
        );
    };
    let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let Some(new) =
        chained(&config, &plugin_entry(args)).with_context(|| format!("{}", path.display()))?
    else {
        return Ok(format!("{} already chains sockmesh", path.display()));
    };
    // A .conf turned into a list must be named .conflist for runtimes to read it as one.
    let target = if path.extension().is_some_and(|e| e == "conflist") {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    write_atomically(&target, &serde_json::to_vec_pretty(&new)?, 0o644)?;
    if target != path {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(format!("sockmesh chained into {}", target.display()))
}

pub fn uninstall(args: &InstallArgs) -> anyhow::Result<()> {
    if let Some(path) = active_config(&args.cni_conf_dir)? {
        let config: Value = serde_json::from_slice(&fs::read(&path)?)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if let Some(new) = unchained(&config) {
            write_atomically(&path, &serde_json::to_vec_pretty(&new)?, 0o644)?;
            tracing::info!(config = %path.display(), "sockmesh removed from the CNI configuration");
        }
    }
    match fs::remove_file(args.cni_bin_dir.join("sockmesh")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    if args.uninstall {
        return uninstall(&args);
    }
    loop {
        match install_once(&args) {
            Ok(what) => tracing::info!("{what}"),
            Err(e) if args.watch => tracing::warn!("{e:#}; trying again"),
            Err(e) => return Err(e),
        }
        if !args.watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        json!({"type": "sockmesh", "agent_socket": "/run/sockmesh/agent.sock"})
    }

    #[test]
    fn chains_last_once_and_replaces_older_entries() {
        let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}, {"type": "portmap"}]});
        let new = chained(&list, &entry()).unwrap().unwrap();
        assert_eq!(new["plugins"][2], entry());
        assert_eq!(chained(&new, &entry()).unwrap(), None, "idempotent");
        let mut older = new.clone();
        older["plugins"][2]["agent_socket"] = json!("/old");
        let again = chained(&older, &entry()).unwrap().unwrap();
        assert_eq!(again["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(again["plugins"][2], entry());
        assert_eq!(unchained(&again).unwrap(), list);
        assert_eq!(unchained(&list), None);
    }

    #[test]
    fn a_single_plugin_becomes_a_list() {
        let conf =
            json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"});
        let new = chained(&conf, &entry()).unwrap().unwrap();
        assert_eq!(new["cniVersion"], "0.4.0");
        assert_eq!(
            new["plugins"][0],
            json!({"type": "bridge", "bridge": "cni0"})
        );
        assert_eq!(new["plugins"][1], entry());
        assert!(chained(&json!({"x": 1}), &entry()).is_err());
    }
}
