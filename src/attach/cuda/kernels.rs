//! Device kernels: F32↔F16 casts, per-row QNT8 quantise and dequantise, and a test pattern,
//! so TENSOR_* bodies of device tensors are made on the device (SPEC §5.2).
//!
//! The CUDA C sources live in `kernels/` at the crate root and are embedded with
//! `include_str!`; [`Kernels::load`] compiles them with NVRTC at run time (loaded dynamically,
//! like the driver) with fused multiply-add off and denormals kept, so the QNT8 bytes are those
//! of the CPU codec ([`crate::codec::tensor::encode_qnt8`] with `row_qnt`) bit for bit, and the
//! F16 casts those of `half::f16::from_f32` for every value but NaN.
//!
//! Raw launches take device pointers and are `unsafe`; the `encode_*_body` methods allocate
//! a complete tensor body (header and data) on the device and are safe.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::{Cuda, DeviceBuffer, Unavailable};
use crate::codec::tensor::{DType, TensorHeader, HEADER_LEN};
use crate::error::{Error, Result};

/// `kernels/cast.cu`: `xcp_f32_to_f16`, `xcp_f16_to_f32`.
pub const CAST_CU: &str = include_str!("../../../kernels/cast.cu");
/// `kernels/qnt8.cu`: `xcp_qnt8_rows`, `xcp_qnt8_rows_to_f32`.
pub const QNT8_CU: &str = include_str!("../../../kernels/qnt8.cu");
/// `kernels/check.cu`: `xcp_fill_pattern`, `xcp_count_mismatch`.
pub const CHECK_CU: &str = include_str!("../../../kernels/check.cu");

/// Threads per block of every launch (`XCP_QNT8_BLOCK` in `qnt8.cu` must match).
pub const BLOCK: u32 = 256;
/// The most blocks of a grid-strided launch.
pub const MAX_GRID: u32 = 65_535;

/// The NVRTC options: IEEE rounding everywhere, no fused multiply-add, denormals kept.
pub fn compile_options() -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(false),
        use_fast_math: Some(false),
        ..Default::default()
    }
}

/// Blocks for `n` items at [`BLOCK`] threads each, at least 1 and at most [`MAX_GRID`].
pub fn grid_for(n: u64) -> u32 {
    n.div_ceil(u64::from(BLOCK)).clamp(1, u64::from(MAX_GRID)) as u32
}

/// Values a cast thread converts per step on its fast path (`XCP_CAST_VEC` in `cast.cu`).
pub const CAST_VEC: u64 = 8;

/// Threads per row of the QNT8 kernels' fast path (`xcp_qnt8_group` in `qnt8.cu`): the power
/// of two at or above `row_len / 4`, at most [`BLOCK`].
pub fn qnt8_group(row_len: u32) -> u32 {
    let want = row_len / 4;
    let mut t = 1;
    while t < want && t < BLOCK {
        t <<= 1;
    }
    t
}

/// Blocks for the QNT8 kernels over `rows` rows: one row per block on the general path, and
/// [`BLOCK`] / [`qnt8_group`] rows per block on the fast path (row_len a multiple of 4).
pub fn qnt8_grid(rows: u64, row_len: u32) -> u32 {
    let per_block = if row_len.is_multiple_of(4) {
        u64::from(BLOCK / qnt8_group(row_len))
    } else {
        1
    };
    rows.div_ceil(per_block).clamp(1, u64::from(MAX_GRID)) as u32
}

/// The value of `#define name value` in a kernel source, if present.
pub fn source_define<'a>(src: &'a str, name: &str) -> Option<&'a str> {
    src.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("#define ")?;
        let (n, v) = rest.split_once(char::is_whitespace)?;
        (n == name).then(|| v.split("/*").next().unwrap_or(v).trim())
    })
}

/// The pattern word of index `i` (as `xcp_pattern` in `check.cu`): a SplitMix64 finaliser of
/// `i · φ + seed`, truncated to 32 bits.
pub fn pattern_word(i: u64, seed: u32) -> u32 {
    let mut z = i
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(u64::from(seed));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// What `xcp_qnt8_rows` computes for one row, step for step, on the CPU: the row's scale and
/// quantised bytes, or `None` for a NaN or infinite value. Used to check the kernel's
/// algorithm against the CPU codec without a GPU.
pub fn qnt8_row_like_kernel(row: &[f32]) -> Option<(f32, Vec<u8>)> {
    let m = row
        .iter()
        .map(|x| x.to_bits() & 0x7fff_ffff)
        .max()
        .unwrap_or(0);
    if m >= 0x7f80_0000 {
        return None;
    }
    if m == 0 {
        return Some((1.0, vec![128; row.len()]));
    }
    let max = f32::from_bits(m);
    let scale = max / 127.0;
    if scale.to_bits() & 0x7f80_0000 != 0 {
        let inv = 1.0 / scale;
        let q = row
            .iter()
            .map(|&x| ((x * inv + 12_583_040.0).to_bits() & 0xff) as u8)
            .collect();
        return Some((scale, q));
    }
    let mut scale = (f64::from(max) / 127.0) as f32;
    if scale == 0.0 {
        scale = f32::from_bits(1);
    }
    let ds = f64::from(scale);
    let q = row
        .iter()
        .map(|&x| ((f64::from(x) / ds).round_ties_even() + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
    Some((scale, q))
}

/// The compiled kernels of one device.
pub struct Kernels {
    cuda: Arc<Cuda>,
    f32_to_f16: CudaFunction,
    f16_to_f32: CudaFunction,
    qnt8_rows: CudaFunction,
    qnt8_rows_to_f32: CudaFunction,
    fill_pattern: CudaFunction,
    count_mismatch: CudaFunction,
    /// 8 bytes of device memory for the results of `qnt8_rows` and `count_mismatch`.
    scratch: std::sync::Mutex<DeviceBuffer>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({:?})", self.cuda)
    }
}

fn launch_err(name: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Io(std::io::Error::other(format!("launch {name}: {e}")))
}

impl Kernels {
    /// Compiles the kernels of `kernels/` with NVRTC and loads them on `cuda`'s device.
    /// [`Unavailable::NvrtcNotFound`] when NVRTC is missing; a compile error is an I/O error
    /// with NVRTC's log.
    pub fn load(cuda: &Arc<Cuda>) -> Result<Kernels> {
        // SAFETY: only tries to dlopen the candidate library names and resolve NVRTC's entry
        // points (cudarc panics when one is missing: caught, and reported as unusable).
        let present =
            std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() });
        if !matches!(present, Ok(true)) {
            return Err(Unavailable::NvrtcNotFound.into());
        }
        let ctx = cuda.context();
        let module = |name: &str, src: &str| {
            let opts = CompileOptions {
                name: Some(name.to_string()),
                ..compile_options()
            };
            let ptx = std::panic::catch_unwind(|| compile_ptx_with_opts(src, opts))
                .map_err(|_| Error::from(Unavailable::NvrtcNotFound))?
                .map_err(|e| Error::Io(std::io::Error::other(format!("NVRTC {name}: {e}"))))?;
            ctx.load_module(ptx)
                .map_err(|e| Error::Io(std::io::Error::other(format!("load {name}: {e}"))))
        };
        let cast = module("cast.cu", CAST_CU)?;
        let qnt8 = module("qnt8.cu", QNT8_CU)?;
        let chk = module("check.cu", CHECK_CU)?;
        let f = |m: &Arc<cudarc::driver::CudaModule>, n: &str| {
            m.load_function(n)
                .map_err(|e| Error::Io(std::io::Error::other(format!("kernel {n}: {e}"))))
        };
        Ok(Kernels {
            cuda: cuda.clone(),
            f32_to_f16: f(&cast, "xcp_f32_to_f16")?,
            f16_to_f32: f(&cast, "xcp_f16_to_f32")?,
            qnt8_rows: f(&qnt8, "xcp_qnt8_rows")?,
            qnt8_rows_to_f32: f(&qnt8, "xcp_qnt8_rows_to_f32")?,
            fill_pattern: f(&chk, "xcp_fill_pattern")?,
            count_mismatch: f(&chk, "xcp_count_mismatch")?,
            scratch: std::sync::Mutex::new(cuda.alloc(8)?),
        })
    }

    /// The device these kernels run on.
    pub fn cuda(&self) -> &Arc<Cuda> {
        &self.cuda
    }

    fn cfg(grid: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Queues `dst[i] = f16(src[i])` for `n` elements on the device's stream.
    ///
    /// # Safety
    ///
    /// `src` must address `n` readable f32 and `dst` `n` writable u16 of this device, alive
    /// until the stream has run the kernel.
    pub unsafe fn f32_to_f16(&self, src: u64, dst: u64, n: u64) -> Result<()> {
        let mut b = self.cuda.stream().launch_builder(&self.f32_to_f16);
        b.arg(&src).arg(&dst).arg(&n);
        // SAFETY: the argument types match the kernel's signature; the caller guarantees the
        // memory.
        unsafe { b.launch(Self::cfg(grid_for(n.div_ceil(CAST_VEC)))) }
            .map(drop)
            .map_err(|e| launch_err("xcp_f32_to_f16", e))
    }

    /// Queues `dst[i] = f32(src[i])` for `n` F16 elements.
    ///
    /// # Safety
    ///
    /// As [`Self::f32_to_f16`] with the types swapped.
    pub unsafe fn f16_to_f32(&self, src: u64, dst: u64, n: u64) -> Result<()> {
        let mut b = self.cuda.stream().launch_builder(&self.f16_to_f32);
        b.arg(&src).arg(&dst).arg(&n);
        // SAFETY: as in `f32_to_f16`.
        unsafe { b.launch(Self::cfg(grid_for(n.div_ceil(CAST_VEC)))) }
            .map(drop)
            .map_err(|e| launch_err("xcp_f16_to_f32", e))
    }

    /// Quantises `rows` rows of `row_len` f32 at `src` into QNT8 rows (scale + bytes) at `dst`,
    /// then waits for the kernel: `Error::Invalid` naming a row with a NaN or infinite value.
    ///
    /// # Safety
    ///
    /// `src` must address `rows · row_len` readable f32 and `dst` `rows · (4 + row_len)`
    /// writable bytes of this device.
    pub unsafe fn qnt8_rows(&self, src: u64, dst: u64, rows: u64, row_len: u32) -> Result<()> {
        let flag = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let fp = flag.ptr();
        // SAFETY: the scratch buffer holds 8 bytes and lives in `self`.
        unsafe { self.cuda.memset_async(fp, 0xff, 8) }?;
        let mut b = self.cuda.stream().launch_builder(&self.qnt8_rows);
        b.arg(&src).arg(&dst).arg(&rows).arg(&row_len).arg(&fp);
        let grid = qnt8_grid(rows, row_len);
        // SAFETY: the argument types match the kernel's signature; the caller guarantees the
        // memory; `flag` lives until the stream is synchronised (by `read`).
        unsafe { b.launch(Self::cfg(grid)) }.map_err(|e| launch_err("xcp_qnt8_rows", e))?;
        let bad = u64::from_le_bytes(flag.read()?[..8].try_into().unwrap_or([0xff; 8]));
        if bad != u64::MAX {
            return Err(Error::invalid(format!(
                "tensor values: NaN or infinite value in QNT8 row {}",
                bad - 1
            )));
        }
        Ok(())
    }

    /// Queues the dequantisation of `rows` QNT8 rows at `src` into f32 at `dst`.
    ///
    /// # Safety
    ///
    /// `src` must address `rows · (4 + row_len)` readable bytes and `dst` `rows · row_len`
    /// writable f32 of this device.
    pub unsafe fn qnt8_rows_to_f32(
        &self,
        src: u64,
        dst: u64,
        rows: u64,
        row_len: u32,
    ) -> Result<()> {
        let mut b = self.cuda.stream().launch_builder(&self.qnt8_rows_to_f32);
        b.arg(&src).arg(&dst).arg(&rows).arg(&row_len);
        let grid = if row_len.is_multiple_of(4) {
            qnt8_grid(rows, row_len)
        } else {
            grid_for(rows.saturating_mul(u64::from(row_len)))
        };
        // SAFETY: as in `f32_to_f16`.
        unsafe { b.launch(Self::cfg(grid)) }
            .map(drop)
            .map_err(|e| launch_err("xcp_qnt8_rows_to_f32", e))
    }

    /// Queues writing [`pattern_word`]`(i, seed)` to the `words` u32 at `dst`.
    ///
    /// # Safety
    ///
    /// `dst` must address `words` writable u32 of this device.
    pub unsafe fn fill_pattern(&self, dst: u64, words: u64, seed: u32) -> Result<()> {
        let mut b = self.cuda.stream().launch_builder(&self.fill_pattern);
        b.arg(&dst).arg(&words).arg(&seed);
        // SAFETY: as in `f32_to_f16`.
        unsafe { b.launch(Self::cfg(grid_for(words))) }
            .map(drop)
            .map_err(|e| launch_err("xcp_fill_pattern", e))
    }

    /// Counts, on the device, the words at `src` that differ from the pattern of `seed`; waits
    /// for the result (only 8 bytes come to the host).
    ///
    /// # Safety
    ///
    /// `src` must address `words` readable u32 of this device.
    pub unsafe fn count_mismatch(&self, src: u64, words: u64, seed: u32) -> Result<u64> {
        let counter = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        counter.write(&0u64.to_le_bytes())?;
        let cp = counter.ptr();
        let mut b = self.cuda.stream().launch_builder(&self.count_mismatch);
        b.arg(&src).arg(&words).arg(&seed).arg(&cp);
        // SAFETY: as in `f32_to_f16`; `counter` lives until the stream is synchronised.
        unsafe { b.launch(Self::cfg(grid_for(words))) }
            .map_err(|e| launch_err("xcp_count_mismatch", e))?;
        Ok(u64::from_le_bytes(
            counter.read()?[..8].try_into().unwrap_or([0xff; 8]),
        ))
    }

    /// A complete TENSOR_F16 body (header + data) made on the device from the f32 tensor of
    /// `shape` at `src`, row-major.
    ///
    /// # Safety
    ///
    /// `src` must address the tensor's `numel` readable f32 of this device.
    pub unsafe fn encode_f16_body(&self, shape: &[u32], src: u64) -> Result<DeviceBuffer> {
        let h = TensorHeader::new(DType::F16, shape)?;
        let n = h.numel()?;
        let body = self.cuda.alloc(
            usize::try_from(h.body_len()?)
                .map_err(|_| Error::invalid("tensor body does not fit in memory"))?,
        )?;
        body.write(&h.to_bytes())?;
        // SAFETY: the body holds HEADER_LEN + 2·n bytes; the caller guarantees `src`.
        unsafe { self.f32_to_f16(src, body.ptr() + HEADER_LEN as u64, n) }?;
        self.cuda.synchronize()?;
        Ok(body)
    }

    /// A complete TENSOR_QNT8 body with one scale per row (`row_qnt`), made on the device from
    /// the f32 tensor of `shape` at `src`, row-major: the bytes of
    /// [`crate::codec::tensor::encode_qnt8`]`(shape, values, true, false)`.
    ///
    /// # Safety
    ///
    /// `src` must address the tensor's `numel` readable f32 of this device.
    pub unsafe fn encode_qnt8_body(&self, shape: &[u32], src: u64) -> Result<DeviceBuffer> {
        let mut h = TensorHeader::new(DType::Qnt8, shape)?;
        h.row_qnt = true;
        let rows = h.rows()?;
        let row_len =
            u32::try_from(h.row_len()).map_err(|_| Error::invalid("QNT8 row longer than u32"))?;
        let body = self.cuda.alloc(
            usize::try_from(h.body_len()?)
                .map_err(|_| Error::invalid("tensor body does not fit in memory"))?,
        )?;
        body.write(&h.to_bytes())?;
        // SAFETY: the body holds HEADER_LEN + rows·(4 + row_len) bytes; the caller guarantees
        // `src`.
        unsafe { self.qnt8_rows(src, body.ptr() + HEADER_LEN as u64, rows, row_len) }?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tensor::{encode_qnt8, TensorView};
    use rand::rngs::SmallRng;
    use rand::{RngCore as _, SeedableRng as _};

    #[test]
    fn kernel_sources_match_the_cpu_layout() {
        // The constants the QNT8 kernel is built on, against the CPU codec.
        let d = |n| source_define(QNT8_CU, n).unwrap_or_else(|| panic!("{n} not defined"));
        assert_eq!(d("XCP_QNT8_BLOCK").parse::<u32>().unwrap(), BLOCK);
        let magic: f32 = d("XCP_QNT8_ROUND_MAGIC")
            .trim_end_matches('f')
            .parse()
            .unwrap();
        assert_eq!(magic, 1.5 * (1u32 << 23) as f32 + 128.0);
        assert_eq!(d("XCP_QNT8_ZERO"), "128");
        let levels: f32 = d("XCP_QNT8_LEVELS").trim_end_matches('f').parse().unwrap();
        let scale_bytes: usize = d("XCP_QNT8_SCALE_BYTES").parse().unwrap();
        // One row of 5 with max 127·2: the CPU writes header, a 4-byte scale, 5 bytes.
        let body = encode_qnt8(&[1, 5], &[254.0, -2.0, 0.0, 1.0, 3.0], true, false).unwrap();
        assert_eq!(body.len(), HEADER_LEN + scale_bytes + 5);
        let v = TensorView::parse(body, None).unwrap();
        let (scale, q) = v.qnt8_rows().unwrap().next().unwrap();
        assert_eq!(scale, 254.0 / levels);
        assert_eq!(q[2], 128);
        for name in ["xcp_qnt8_rows", "xcp_qnt8_rows_to_f32"] {
            assert!(
                QNT8_CU.contains(&format!("__global__ void {name}(")),
                "{name}"
            );
        }
        for name in ["xcp_f32_to_f16", "xcp_f16_to_f32"] {
            assert!(
                CAST_CU.contains(&format!("__global__ void {name}(")),
                "{name}"
            );
        }
        // No fused multiply-add and no fast math, or the bytes would differ from the CPU's.
        let opts = compile_options();
        assert_eq!(
            (opts.fmad, opts.ftz, opts.use_fast_math),
            (Some(false), Some(false), Some(false))
        );
    }

    /// Rows that take every path: zero, normal, ties, subnormal scale, tiny scale, extremes.
    fn rows() -> Vec<Vec<f32>> {
        let mut rows = vec![
            vec![0.0, -0.0, 0.0],
            vec![127.0, 0.5, 1.5, -0.5, -2.5, -127.0],
            vec![f32::MAX, -f32::MAX, 1.0],
            vec![f32::from_bits(1), -f32::from_bits(300), 1e-40],
            vec![1e-36, -3e-37, 5e-38],
            vec![],
        ];
        let mut rng = SmallRng::seed_from_u64(0x1234_5678);
        for len in [1usize, 7, 255, 256, 257, 1000] {
            rows.push(
                (0..len)
                    .map(|_| {
                        let b = rng.next_u32();
                        // Any finite value, either sign: an all-ones exponent is moved down.
                        f32::from_bits(if b & 0x7f80_0000 == 0x7f80_0000 {
                            b ^ 0x4000_0000
                        } else {
                            b
                        })
                    })
                    .collect(),
            );
        }
        rows
    }

    #[test]
    fn kernel_algorithm_matches_the_cpu_codec_bit_for_bit() {
        for row in rows() {
            let (scale, q) = qnt8_row_like_kernel(&row).unwrap();
            let shape = [1u32, row.len() as u32];
            let body = encode_qnt8(&shape, &row, true, false).unwrap();
            let v = TensorView::parse(body, None).unwrap();
            let (cpu_scale, cpu_q) = v.qnt8_rows().unwrap().next().unwrap();
            assert_eq!(scale.to_bits(), cpu_scale.to_bits(), "{row:?}");
            assert_eq!(q, cpu_q, "{row:?}");
        }
        assert_eq!(qnt8_row_like_kernel(&[1.0, f32::NAN]), None);
        assert_eq!(qnt8_row_like_kernel(&[f32::INFINITY]), None);
    }

    #[test]
    fn pattern_and_grid() {
        assert_ne!(pattern_word(0, 1), pattern_word(1, 1));
        assert_ne!(pattern_word(5, 1), pattern_word(5, 2));
        for c in [
            "0x9e3779b97f4a7c15ull",
            "0xbf58476d1ce4e5b9ull",
            "0x94d049bb133111ebull",
        ] {
            assert!(CHECK_CU.contains(c), "{c}");
        }
        assert_eq!(grid_for(0), 1);
        assert_eq!(grid_for(257), 2);
        assert_eq!(grid_for(u64::MAX), MAX_GRID);
        assert_eq!(source_define("#define A 1 /* x */\n", "A"), Some("1"));
    }
}
