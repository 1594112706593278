//! A sandbox's root file system: the image, shared read-only by every sandbox that uses it,
//! under a writable layer of the sandbox's own (overlayfs). The layer lives in a file system of
//! its own — an ext4 image file of a fixed size, mounted through a loop device — so a sandbox
//! that fills its disk fills only its layer, and it stays on disk across stops and node
//! restarts. Its root directory belongs to the sandbox's root (the range's base id).
//!
//! In the sandbox's directory: `layer.img` (the file system), `layer/` (where it is mounted:
//! `upper/` holds what the sandbox wrote, `work/` is overlayfs's), `rootfs/` (the merged root
//! the OCI runtime starts the sandbox in).

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::bundle::{IdRange, WORK};
use super::Tools;
use crate::backend::BackendError;

/// The size of a sandbox's writable layer.
pub(super) const LAYER_BYTES: u64 = 1 << 30;

pub(super) struct Layer {
    dir: PathBuf,
}

impl Layer {
    pub(super) fn of(sandbox_dir: &Path) -> Layer {
        Layer { dir: sandbox_dir.to_path_buf() }
    }

    fn image(&self) -> PathBuf {
        self.dir.join("layer.img")
    }

    fn mounted_at(&self) -> PathBuf {
        self.dir.join("layer")
    }

    /// Bytes in use on the layer's file system (what the sandbox wrote, and the file system's
    /// own), while it is mounted.
    pub(super) fn used_bytes(&self) -> Option<u64> {
        let at = self.mounted_at();
        if !is_mount_point(&at) {
            return None;
        }
        let stats = nix::sys::statvfs::statvfs(&at).ok()?;
        let used_blocks = (stats.blocks() as u64).saturating_sub(stats.blocks_free() as u64);
        Some(used_blocks * stats.fragment_size() as u64)
    }

    /// What the sandbox wrote, as the host sees it.
    pub(super) fn upper(&self) -> PathBuf {
        self.mounted_at().join("upper")
    }

    pub(super) fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Makes the layer if it is new, and mounts it and the merged root over `image` (each only
    /// if it is not mounted yet); returns the merged root.
    pub(super) fn mount(&self, tools: &Tools, image: &Path, ids: IdRange) -> Result<PathBuf, BackendError> {
        self.mount_layer(tools, ids)?;
        let (upper, work) = (self.upper(), self.mounted_at().join("work"));
        for dir in [&upper, &work] {
            if !dir.exists() {
                std::fs::create_dir(dir)?;
                std::os::unix::fs::chown(dir, Some(ids.base), Some(ids.base))?;
            }
        }
        let home = upper.join(WORK.trim_start_matches('/'));
        if !home.exists() {
            std::fs::create_dir(&home)?;
            std::os::unix::fs::chown(&home, Some(ids.base), Some(ids.base))?;
        }
        let rootfs = self.rootfs();
        std::fs::create_dir_all(&rootfs)?;
        if !is_mount_point(&rootfs) {
            let options =
                format!("lowerdir={},upperdir={},workdir={}", image.display(), upper.display(), work.display());
            mount(
                Some("overlay"),
                &rootfs,
                Some("overlay"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.as_str()),
            )
            .map_err(|e| BackendError::Retryable(format!("cannot mount the sandbox's root: {e}")))?;
        }
        Ok(rootfs)
    }

    /// Makes the layer if it is new and mounts it (not the merged root), unless it is mounted.
    pub(super) fn mount_layer(&self, tools: &Tools, ids: IdRange) -> Result<(), BackendError> {
        if !self.image().exists() {
            self.make(tools, ids)?;
        }
        let at = self.mounted_at();
        std::fs::create_dir_all(&at)?;
        if !is_mount_point(&at) {
            let options = "loop,nosuid,nodev".as_ref();
            run(&tools.mount, &["-o".as_ref(), options, self.image().as_os_str(), at.as_os_str()])?;
        }
        Ok(())
    }

    /// Empties the mounted layer (the merged root must not be mounted): what the sandbox wrote
    /// and overlayfs's own work directory. Returns the empty `upper/`.
    pub(super) fn clear(&self, ids: IdRange) -> Result<PathBuf, BackendError> {
        for dir in [self.upper(), self.mounted_at().join("work")] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        let upper = self.upper();
        std::fs::create_dir(&upper)?;
        std::os::unix::fs::chown(&upper, Some(ids.base), Some(ids.base))?;
        Ok(upper)
    }

    /// A new ext4 file system of [`LAYER_BYTES`] (a sparse file: it takes what is written).
    fn make(&self, tools: &Tools, ids: IdRange) -> Result<(), BackendError> {
        let partial = self.dir.join("layer.img.partial");
        let file = std::fs::File::create(&partial)?;
        file.set_len(LAYER_BYTES)?;
        drop(file);
        let owner = format!("root_owner={}:{}", ids.base, ids.base);
        run(&tools.mkfs_ext4, &["-q".as_ref(), "-F".as_ref(), "-E".as_ref(), owner.as_ref(), partial.as_os_str()])?;
        std::fs::rename(&partial, self.image())?;
        Ok(())
    }

    /// Unmounts the merged root and the layer (whatever of them is mounted).
    pub(super) fn unmount(&self) -> Result<(), BackendError> {
        for point in [self.rootfs(), self.mounted_at()] {
            if is_mount_point(&point) {
                umount2(&point, MntFlags::empty())
                    .map_err(|e| BackendError::Retryable(format!("cannot unmount {}: {e}", point.display())))?;
            }
        }
        Ok(())
    }
}

/// Whether `path` is where a file system is mounted (its device differs from its parent's).
pub(super) fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) = (std::fs::metadata(path), path.parent().map(std::fs::metadata)) else {
        return false;
    };
    here.dev() != parent.dev()
}

/// Runs a helper program (by its absolute path) to completion; its error output in the error.
pub(super) fn run(program: &Path, args: &[&std::ffi::OsStr]) -> Result<(), BackendError> {
    let output = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .output()
        .map_err(|e| BackendError::Retryable(format!("cannot run {}: {e}", program.display())))?;
    if output.status.success() {
        return Ok(());
    }
    Err(BackendError::Retryable(format!(
        "{} failed ({}): {}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}
