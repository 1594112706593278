//! What a VM's node hands over when the VM migrates (`LibvirtBackend::export`/`import`): a tar
//! of `manifest.json` (its image and that image's SHA-256, its snapshots' libvirt XML) and, on
//! a real hypervisor, its disk (a qcow2 overlay, with the snapshots inside) and its console log.
//! The destination rebases the overlay onto its own copy of the image, which must be the same
//! image (the digests are compared): the overlay holds only what the VM wrote.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackendError;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// Its domain's UUID, which it keeps (its snapshots' definitions name it).
    pub uuid: Option<String>,
    /// The image its disk is an overlay on, and that image's disk's SHA-256.
    pub image: Option<String>,
    pub image_sha256: Option<String>,
    /// Its snapshots: name and libvirt XML, oldest first.
    pub snapshots: Vec<(String, String)>,
    /// Whether the export holds a disk.
    pub disk: bool,
}

/// The names its files have in an export.
const DISK: &str = "disk.qcow2";
const CONSOLE: &str = "console.log";
const MANIFEST: &str = "manifest.json";

/// Packs `manifest`, `disk` and `console` (those that exist) into the tar `into`.
pub async fn pack(into: &Path, manifest: &Manifest, disk: &Path, console: &Path) -> Result<(), BackendError> {
    let parts = into.with_extension("parts");
    let _ = std::fs::remove_dir_all(&parts);
    std::fs::create_dir_all(&parts)?;
    std::fs::write(parts.join(MANIFEST), serde_json::to_vec(manifest).unwrap_or_default())?;
    let mut names = vec![MANIFEST];
    for (file, name) in [(disk, DISK), (console, CONSOLE)] {
        if file.exists() {
            // A hard link: the disk is not copied before it is packed.
            std::fs::hard_link(file, parts.join(name)).or_else(|_| std::fs::copy(file, parts.join(name)).map(drop))?;
            names.push(name);
        }
    }
    let mut tar = tokio::process::Command::new("tar");
    tar.arg("--sparse").arg("-cf").arg(into).arg("-C").arg(&parts).args(&names);
    let packed = run(tar, "tar").await;
    std::fs::remove_dir_all(&parts)?;
    packed
}

/// Unpacks the export `from`: its manifest, and its disk and console log moved to `disk` and
/// `console`.
pub async fn unpack(from: &Path, disk: &Path, console: &Path) -> Result<Manifest, BackendError> {
    let parts = disk.with_extension("import");
    let _ = std::fs::remove_dir_all(&parts);
    std::fs::create_dir_all(&parts)?;
    let mut tar = tokio::process::Command::new("tar");
    tar.arg("-xf").arg(from).arg("-C").arg(&parts);
    run(tar, "tar").await?;
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(parts.join(MANIFEST))?)
        .map_err(|e| BackendError::Permanent(format!("the export's manifest is not readable: {e}")))?;
    for (name, to) in [(DISK, disk), (CONSOLE, console)] {
        if parts.join(name).exists() {
            std::fs::rename(parts.join(name), to)?;
        }
    }
    std::fs::remove_dir_all(&parts)?;
    Ok(manifest)
}

/// Makes an imported overlay use this node's copy of its image (`base`); an overlay with no
/// image must name no backing file at all (a crafted one would read a file of this node).
pub async fn rebase(disk: &Path, base: Option<&Path>) -> Result<(), BackendError> {
    let mut qemu_img = tokio::process::Command::new("qemu-img");
    match base {
        Some(base) => qemu_img.args(["rebase", "-u", "-F", "qcow2", "-b"]).arg(base).arg(disk),
        // `rebase -u -b ""` drops any backing file name without reading it.
        None => qemu_img.args(["rebase", "-u", "-b", ""]).arg(disk),
    };
    run(qemu_img, "qemu-img rebase").await
}

/// The SHA-256 of an image's disk, computed once and kept beside it (images do not change).
pub fn image_digest(disk: &Path) -> Result<String, BackendError> {
    let kept = PathBuf::from(format!("{}.sha256", disk.display()));
    if let Ok(digest) = std::fs::read_to_string(&kept) {
        return Ok(digest.trim().to_string());
    }
    let mut file = std::fs::File::open(disk)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    let digest = hex::encode(hasher.finalize());
    std::fs::write(&kept, &digest)?;
    Ok(digest)
}

async fn run(mut command: tokio::process::Command, what: &str) -> Result<(), BackendError> {
    let output = command.output().await.map_err(|e| BackendError::Permanent(format!("cannot run {what}: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(BackendError::Permanent(format!("{what} failed: {}", String::from_utf8_lossy(&output.stderr).trim())))
}
