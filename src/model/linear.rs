//! A linear layer, or several that read the same input fused into one (q|k|v, gate|up): one
//! activation quantization and one pass over the thread pool instead of several. Our int8
//! kernels run the GGUF types they know; candle's matmuls run the rest.

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::quant::{self, GgmlMatrix, Input, Q4_1Matrix, Q8_0Matrix, Sink};
use super::Precision;
use crate::math;

pub(super) struct Linear {
    kernel: Kernel,
    pub(super) out: usize,
    /// Our kernel's gate and up panels alternate (`quant::gate_up_order`), for a SwiGLU sink.
    paired: bool,
}

enum Kernel {
    /// Our SIMD kernels (see `quant`).
    Q4_1(Q4_1Matrix),
    Q8_0(Q8_0Matrix),
    /// candle's matmuls (other quantizations, dense weights); several parts are concatenated.
    Candle(Vec<QMatMul>),
}

impl Linear {
    /// `gate_up`: the weights are [gate, up], to be paired panel by panel for a SwiGLU sink.
    pub(super) fn fuse(weights: Vec<QTensor>, gate_up: bool) -> Result<Self> {
        let out = weights.iter().map(|w| w.shape().dims()[0]).sum();
        let cols = weights[0].shape().dims()[1];
        let dtype = weights[0].dtype();
        let same = weights
            .iter()
            .all(|w| w.dtype() == dtype && w.shape().dims()[1] == cols);
        // Same type and width: the parts' bytes, concatenated, are the fused matrix (its rows
        // reordered to pair gate and up panels when that is asked and possible).
        let order = gate_up.then(|| quant::gate_up_order(out / 2)).flatten();
        let paired = order.is_some();
        let ours = |make: fn(&[u8], usize, usize) -> Option<Kernel>| -> Result<Self> {
            let mut bytes = Vec::new();
            for w in &weights {
                bytes.extend_from_slice(&w.data()?);
            }
            if let Some(order) = &order {
                let row = bytes.len() / out;
                bytes = order
                    .iter()
                    .flat_map(|&j| &bytes[j * row..(j + 1) * row])
                    .copied()
                    .collect();
            }
            let kernel = make(&bytes, out, cols).context("malformed quantized tensor")?;
            Ok(Self {
                kernel,
                out,
                paired,
            })
        };
        match dtype {
            GgmlDType::Q4_1 if same => {
                return ours(|b, r, c| Q4_1Matrix::from_ggml(b, r, c).map(Kernel::Q4_1))
            }
            GgmlDType::Q8_0 if same => {
                return ours(|b, r, c| Q8_0Matrix::from_ggml(b, r, c).map(Kernel::Q8_0))
            }
            _ => {}
        }
        if same && weights.len() > 1 {
            let mut bytes = Vec::new();
            for w in &weights {
                bytes.extend_from_slice(&w.data()?);
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype)?;
            let fused = QTensor::new(storage, (out, cols))?;
            return Ok(Self {
                kernel: Kernel::Candle(vec![QMatMul::from_qtensor(fused)?]),
                out,
                paired: false,
            });
        }
        let parts = weights
            .into_iter()
            .map(QMatMul::from_qtensor)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            kernel: Kernel::Candle(parts),
            out,
            paired: false,
        })
    }

    /// Dense weights, kept in f32 or quantized to Q8_0 as `precision` asks (Q8_0 needs whole
    /// 32-value blocks per row; other shapes stay f32).
    pub(super) fn dense(weights: Vec<Tensor>, precision: Precision, gate_up: bool) -> Result<Self> {
        let blocks = weights.iter().all(|w| w.dim(1).is_ok_and(|c| c % 32 == 0));
        if precision == Precision::Q8_0 && blocks {
            let quantized = weights
                .iter()
                .map(|w| QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0))
                .collect::<candle_core::Result<_>>()?;
            return Self::fuse(quantized, gate_up);
        }
        let out = weights
            .iter()
            .map(|w| w.dim(0))
            .sum::<candle_core::Result<usize>>()?;
        let weights = weights
            .iter()
            .map(|w| w.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = if weights.len() == 1 {
            weights[0].clone()
        } else {
            Tensor::cat(&weights, 0)?
        };
        Ok(Self {
            kernel: Kernel::Candle(vec![QMatMul::Tensor(w)]),
            out,
            paired: false,
        })
    }

    /// `input` (`n` rows) through this layer, into `sink`. Our kernels normalise and apply the
    /// sink inside their pool call; the others run the same steps around candle's matmul.
    pub(super) fn forward(&self, input: Input, n: usize, sink: Sink) -> candle_core::Result<()> {
        // Our kernels pair gate and up panels only where the matrix was laid out for it.
        let fits = self.paired || !matches!(sink, Sink::SwiGlu(..));
        match &self.kernel {
            Kernel::Q4_1(w) if fits => {
                quant::matmul_into(w, input, n, sink);
                return Ok(());
            }
            Kernel::Q8_0(w) if fits => {
                quant::matmul_into(w, input, n, sink);
                return Ok(());
            }
            _ => {}
        }
        let mut normed = Vec::new();
        let x = match input.norm {
            Some((weight, eps)) => {
                normed.resize(input.x.len(), 0.0);
                rms_norm(input.x, weight, eps, &mut normed);
                &normed
            }
            None => input.x,
        };
        let y = self.products(x, n)?;
        match sink {
            Sink::Store(out) => out.copy_from_slice(&y),
            Sink::Add(out) => add(out, &y),
            Sink::SwiGlu(out, blocks) => {
                let half = self.out / 2;
                for (r, a) in y.chunks_exact(self.out).zip(out.chunks_exact_mut(half)) {
                    let (g, u) = r.split_at(half);
                    math::silu_mul(g, u, a);
                }
                if let Some(blocks) = blocks {
                    // SAFETY: this thread alone writes them, before the next matmul.
                    unsafe { blocks.blocks(0, out) };
                }
            }
        }
        Ok(())
    }

    /// Whether this layer's kernel reads its input as quantized blocks (`Input::quantized`);
    /// those kernels hold whole blocks per row, so its input width is one too.
    pub(super) fn takes_blocks(&self) -> bool {
        matches!(self.kernel, Kernel::Q4_1(_) | Kernel::Q8_0(_))
    }

    /// `x` is `n` rows; returns `n` rows of `self.out` values (rows in the matrix's order).
    fn products(&self, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        let plain = Input::plain(x);
        let mut y = vec![0f32; n * self.out];
        let parts = match &self.kernel {
            Kernel::Q4_1(w) => {
                quant::matmul_into(w, plain, n, Sink::Store(&mut y));
                return Ok(y);
            }
            Kernel::Q8_0(w) => {
                quant::matmul_into(w, plain, n, Sink::Store(&mut y));
                return Ok(y);
            }
            Kernel::Candle(parts) => parts,
        };
        let input = Tensor::from_slice(x, (n, x.len() / n), &Device::Cpu)?;
        if let [one] = parts.as_slice() {
            return one.forward(&input)?.flatten_all()?.to_vec1();
        }
        let outs = parts
            .iter()
            .map(|p| p.forward(&input))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&outs, 1)?.flatten_all()?.to_vec1()
    }
}

pub(super) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let k = weight.len();
    for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let s = math::inv_rms(row, eps);
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * s * w;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
