//! Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) from Debian's
//! `dataset-fashion-mnist` package: four gzip'd idx files, read as they are installed.
//! Nothing is downloaded; a missing, truncated or malformed file is an error that names the
//! file and the package.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

/// The Debian package that installs the data.
pub const PACKAGE: &str = "dataset-fashion-mnist";
/// Where that package installs it.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Pixels per image (28 × 28).
pub const PIXELS: usize = 28 * 28;
/// Classes (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag,
/// ankle boot).
pub const CLASSES: usize = 10;

/// One split: `len()` images of [`PIXELS`] values in [0, 1] (pixel / 255), row-major, and
/// their labels in 0..[`CLASSES`].
#[derive(Clone, Debug)]
pub struct Split {
    /// `len() × PIXELS` values.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The first `n` examples (all of them if there are fewer).
    pub fn head(&self, n: usize) -> Split {
        let n = n.min(self.len());
        Split {
            images: self.images[..n * PIXELS].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// The images at `indices`, gathered into one row-major batch, and their labels as f32.
    pub fn gather(&self, indices: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let mut images = Vec::with_capacity(indices.len() * PIXELS);
        for &i in indices {
            images.extend_from_slice(&self.images[i * PIXELS..(i + 1) * PIXELS]);
        }
        let labels = indices.iter().map(|&i| self.labels[i] as f32).collect();
        (images, labels)
    }
}

/// The training (60 000) and test (10 000) splits.
#[derive(Clone, Debug)]
pub struct FashionMnist {
    /// `train-*-ubyte.gz`.
    pub train: Split,
    /// `t10k-*-ubyte.gz`.
    pub test: Split,
}

/// Reads both splits from `dir`, at most `train_limit` / `test_limit` examples of each
/// (reading stops there; `None` reads the whole file and checks its gzip trailer).
pub fn load(
    dir: &Path,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
) -> Result<FashionMnist, String> {
    Ok(FashionMnist {
        train: load_split(dir, "train", train_limit)?,
        test: load_split(dir, "t10k", test_limit)?,
    })
}

fn load_split(dir: &Path, prefix: &str, limit: Option<usize>) -> Result<Split, String> {
    let images = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (n_images, pixels) = read_idx(&images, 0x0803, limit)?;
    let (n_labels, labels_raw) = read_idx(&labels, 0x0801, limit)?;
    if n_images != n_labels {
        return Err(format!(
            "{} holds {n_images} images but {} holds {n_labels} labels; {}",
            images.display(),
            labels.display(),
            reinstall()
        ));
    }
    if let Some(bad) = labels_raw.iter().find(|&&l| l as usize >= CLASSES) {
        return Err(format!(
            "{}: label {bad} is not a class (0..{CLASSES}); {}",
            labels.display(),
            reinstall()
        ));
    }
    Ok(Split {
        images: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: labels_raw,
    })
}

fn reinstall() -> String {
    format!("reinstall Debian's package {PACKAGE} (apt-get install --reinstall {PACKAGE})")
}

/// Reads one gzip'd idx file with `magic` (0x0803: images of 28 × 28; 0x0801: labels):
/// returns the number of items read and their bytes.
fn read_idx(path: &Path, magic: u32, limit: Option<usize>) -> Result<(usize, Vec<u8>), String> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            format!(
                "{}: not found. The Fashion-MNIST files come from Debian's package {PACKAGE} \
                 (apt-get install {PACKAGE}); or pass --data DIR",
                path.display()
            )
        } else {
            format!("{}: {e}", path.display())
        }
    })?;
    let mut gz = GzDecoder::new(BufReader::new(file));
    let what = |e: std::io::Error, at: &str| -> String {
        let cause = match e.kind() {
            ErrorKind::UnexpectedEof => "truncated".to_string(),
            _ => format!("unreadable ({e})"),
        };
        format!("{}: {cause} {at}; {}", path.display(), reinstall())
    };
    let dims = if magic == 0x0803 { 3 } else { 1 };
    let mut header = vec![0u8; 4 + 4 * dims];
    gz.read_exact(&mut header)
        .map_err(|e| what(e, "in the idx header"))?;
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != magic {
        return Err(format!(
            "{}: not an idx file of the expected kind (magic {:#010x}, expected {magic:#010x}); {}",
            path.display(),
            word(0),
            reinstall()
        ));
    }
    let count = word(4) as usize;
    let item = if dims == 3 {
        let (rows, cols) = (word(8) as usize, word(12) as usize);
        if rows * cols != PIXELS {
            return Err(format!(
                "{}: images of {rows}×{cols}, expected 28×28; {}",
                path.display(),
                reinstall()
            ));
        }
        PIXELS
    } else {
        1
    };
    let n = limit.map_or(count, |l| l.min(count));
    let mut data = vec![0u8; n * item];
    gz.read_exact(&mut data).map_err(|e| {
        let at = if n == count {
            format!("before the {count} items its header promises")
        } else {
            format!("before item {n} of the {count} its header promises")
        };
        what(e, &at)
    })?;
    if n == count {
        // Reading to the end checks the gzip trailer (CRC and length) too.
        std::io::copy(&mut gz, &mut std::io::sink()).map_err(|e| what(e, "at its end"))?;
    }
    Ok((n, data))
}

/// The data directory: `--data`, or the package's.
pub fn default_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DIR)
}
