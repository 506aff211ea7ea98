//! `cargo xtask image`: OCI image archives of sockmesh, its proxy, the test programs and a
//! pause image, built from this machine's own files with no base image: each holds its
//! binaries, the shared libraries `ldd` resolves for them (the loader included) and little
//! else. That is the smallest image that runs here and the quickest to start, and nothing has
//! to be pulled.
//!
//! Each archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) with one
//! uncompressed layer, named in index.json so that `ctr images import` tags it. The same
//! inputs give the same bytes: entries sorted, times, owners and names fixed.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{output, root, say};

/// One image: its archive's name, its reference, its entrypoint and what it holds.
pub struct Image {
    pub file: &'static str,
    pub reference: String,
    pub entrypoint: Vec<String>,
    /// Path in the image -> file on this machine.
    pub files: BTreeMap<String, PathBuf>,
    /// Path in the image -> symlink target.
    pub links: BTreeMap<String, String>,
}

/// The references `cargo xtask image` gives, with `tag` for the released images.
pub fn images(release: &Path, tag: &str) -> Result<Vec<Image>> {
    let ip = ip_binary()?;
    let bin = |name: &str| release.join(name);
    let testkit_files = BTreeMap::from([(
        "/usr/local/bin/sockmesh-testkit".to_string(),
        bin("sockmesh-testkit"),
    )]);
    Ok(vec![
        Image {
            file: "sockmesh",
            reference: format!("ghcr.io/sockmesh/sockmesh:{tag}"),
            entrypoint: vec!["/usr/local/bin/sockmesh".into()],
            files: BTreeMap::from([
                ("/usr/local/bin/sockmesh".to_string(), bin("sockmesh")),
                ("/usr/sbin/ip".to_string(), ip.clone()),
            ]),
            // Istio's injection template runs the image as istio-iptables or pilot-agent.
            links: BTreeMap::from([
                (
                    "/usr/local/bin/istio-iptables".to_string(),
                    "sockmesh".into(),
                ),
                ("/usr/local/bin/pilot-agent".to_string(), "sockmesh".into()),
            ]),
        },
        Image {
            file: "sockmesh-proxy",
            reference: format!("ghcr.io/sockmesh/sockmesh-proxy:{tag}"),
            entrypoint: vec!["/usr/local/bin/sockmesh-proxy".into()],
            files: BTreeMap::from([(
                "/usr/local/bin/sockmesh-proxy".to_string(),
                bin("sockmesh-proxy"),
            )]),
            links: BTreeMap::new(),
        },
        Image {
            file: "testkit",
            reference: "localhost/sockmesh/testkit:dev".into(),
            entrypoint: vec!["/usr/local/bin/sockmesh-testkit".into()],
            files: testkit_files.clone(),
            links: BTreeMap::new(),
        },
        Image {
            file: "pause",
            reference: "localhost/sockmesh/pause:dev".into(),
            entrypoint: vec!["/usr/local/bin/sockmesh-testkit".into(), "pause".into()],
            files: testkit_files,
            links: BTreeMap::new(),
        },
    ])
}

/// Where this machine's `ip` is.
fn ip_binary() -> Result<PathBuf> {
    for p in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if Path::new(p).is_file() {
            return Ok(fs::canonicalize(p)?);
        }
    }
    bail!("ip is missing: run `cargo xtask setup` (iproute2)")
}

/// Release builds, then every image into `dir`.
pub fn build(dir: &Path, tag: &str) -> Result<()> {
    crate::build_release()?;
    let release = root().join("target/release");
    fs::create_dir_all(dir)?;
    for image in images(&release, tag)? {
        let path = dir.join(format!("{}.tar", image.file));
        let layer = write_archive(&image, &path)?;
        say(format!(
            "image {} -> {} ({:.1} MiB, {} files)",
            image.reference,
            path.display(),
            layer.bytes as f64 / (1 << 20) as f64,
            layer.files
        ));
    }
    Ok(())
}

/// What went into a layer.
pub struct Layer {
    pub bytes: usize,
    pub files: usize,
}

/// The files of `image` with the shared libraries they load.
fn with_libraries(image: &Image) -> Result<BTreeMap<String, PathBuf>> {
    let mut all = image.files.clone();
    for src in image.files.values() {
        let out = output(Command::new("ldd").arg(src))
            .with_context(|| format!("ldd {}", src.display()))?;
        for lib in ldd_paths(&out) {
            let real = fs::canonicalize(&lib).with_context(|| format!("resolving {lib}"))?;
            all.insert(lib, real);
        }
    }
    Ok(all)
}

/// The library paths in `ldd`'s output (the loader's included, the vDSO not).
pub fn ldd_paths(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// The layer: every file and link, their folders, /tmp, and passwd/group naming root and the
/// sidecar's user.
fn layer(image: &Image) -> Result<(Vec<u8>, usize)> {
    let files = with_libraries(image)?;
    let mut dirs = std::collections::BTreeSet::from(["tmp".to_string(), "etc".to_string()]);
    for p in files.keys().chain(image.links.keys()) {
        let mut d = Path::new(p.trim_start_matches('/')).parent();
        while let Some(x) = d.filter(|x| !x.as_os_str().is_empty()) {
            dirs.insert(x.to_string_lossy().into_owned());
            d = x.parent();
        }
    }
    let mut t = tar::Builder::new(Vec::new());
    for d in &dirs {
        let mut h = header(
            tar::EntryType::Directory,
            if d == "tmp" { 0o1777 } else { 0o755 },
            0,
        );
        t.append_data(&mut h, format!("{d}/"), std::io::empty())?;
    }
    let etc: [(&str, &[u8]); 2] = [
        ("etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\nistio-proxy:x:1337:1337:sidecar:/tmp:/sbin/nologin\n"),
        ("etc/group", b"root:x:0:\nistio-proxy:x:1337:\n"),
    ];
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for (p, src) in &files {
        entries.insert(p.trim_start_matches('/').into(), Entry::File(src.clone()));
    }
    for (p, target) in &image.links {
        entries.insert(
            p.trim_start_matches('/').into(),
            Entry::Link(target.clone()),
        );
    }
    for (p, bytes) in etc {
        entries.insert(p.into(), Entry::Bytes(bytes.to_vec()));
    }
    for (path, e) in &entries {
        match e {
            Entry::File(src) => {
                let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
                t.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Link(target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                t.append_link(&mut h, path, target)?;
            }
            Entry::Bytes(b) => {
                let mut h = header(tar::EntryType::Regular, 0o644, b.len() as u64);
                t.append_data(&mut h, path, b.as_slice())?;
            }
        }
    }
    Ok((t.into_inner()?, files.len()))
}

enum Entry {
    File(PathBuf),
    Link(String),
    Bytes(Vec<u8>),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// `bytes`' SHA-256 as OCI writes it: "sha256:" and 64 hex digits.
pub fn digest(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Write `image` as an OCI image layout archive at `path`.
pub fn write_archive(image: &Image, path: &Path) -> Result<Layer> {
    let (layer, files) = layer(image)?;
    let archive = oci_layout(image, &layer)?;
    let mut f = fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(&archive)?;
    Ok(Layer {
        bytes: layer.len(),
        files,
    })
}

/// The layout archive around one layer.
pub fn oci_layout(image: &Image, layer: &[u8]) -> Result<Vec<u8>> {
    let layer_digest = digest(layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": image.entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": image.reference,
                "org.opencontainers.image.ref.name": image.reference,
            },
        }],
    }))?;
    let mut t = tar::Builder::new(Vec::new());
    let mut add = |name: String, bytes: &[u8]| -> Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
        t.append_data(&mut h, name, bytes)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for blob in [layer, &config, &manifest] {
        let d = digest(blob);
        add(format!("blobs/sha256/{}", &d["sha256:".len()..]), blob)?;
    }
    Ok(t.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                   \tlibgone.so => not found\n";
        assert_eq!(
            ldd_paths(out),
            vec![
                "/lib/x86_64-linux-gnu/libc.so.6".to_string(),
                "/lib64/ld-linux-x86-64.so.2".to_string()
            ]
        );
        assert!(ldd_paths("\tstatically linked\n").is_empty());
    }

    /// The archive reads back: index -> manifest -> config and layer, each blob named by its
    /// digest, with the sizes the descriptors give; the same input gives the same bytes.
    #[test]
    fn layout_reads_back_and_is_deterministic() {
        let image = Image {
            file: "t",
            reference: "localhost/t:1".into(),
            entrypoint: vec!["/x".into()],
            files: BTreeMap::new(),
            links: BTreeMap::new(),
        };
        let layer = b"not really a tar".to_vec();
        let a = oci_layout(&image, &layer).unwrap();
        assert_eq!(a, oci_layout(&image, &layer).unwrap());
        let mut blobs = BTreeMap::new();
        for e in tar::Archive::new(a.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            blobs.insert(name, data);
        }
        let blob = |d: &serde_json::Value| -> Vec<u8> {
            let d = d.as_str().unwrap();
            let data = blobs[&format!("blobs/sha256/{}", &d[7..])].clone();
            assert_eq!(digest(&data), d);
            data
        };
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "localhost/t:1"
        );
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&m["digest"])).unwrap();
        assert_eq!(blob(&manifest["layers"][0]["digest"]), layer);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        assert_eq!(config["config"]["Entrypoint"][0], "/x");
    }
}
