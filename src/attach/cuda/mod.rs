//! GPU tensors by handle (feature `cuda`): `cuda-ipc://` attachments (SPEC §7), device views
//! as DLPack `kDLCUDA` tensors, and the device kernels of [`kernels`].
//!
//! The CUDA driver and NVRTC are loaded at run time (cudarc's dynamic loading), so this module
//! builds and its tests run on machines without a GPU or a CUDA install: [`Cuda::load`] then
//! fails with an [`Unavailable`] reason instead of panicking.
//!
//! - **Export** ([`Cuda::export`]): a device pointer and a length become a [`DeviceExport`]
//!   whose URI names the IPC handle of the allocation's base (found with
//!   `cuMemGetAddressRange`), the offset into it, the size, the device UUID (not the ordinal:
//!   `CUDA_VISIBLE_DEVICES` differs between processes) and an IPC event recorded on the
//!   producer's stream after its writes. The IPC handle is made once per allocation and cached
//!   (keyed by base and the driver's buffer id, so a freed and reallocated base gets a new
//!   handle); events come from a bounded pool (the driver limits them) and go back to it when
//!   the export is dropped, which the producer does when the consumer ACKed.
//! - **Import** ([`Cuda::import`]): each memory handle is opened once per process (CUDA
//!   refuses a second open) and the mapping is cached, with the set of producer sessions that
//!   use it; [`release_producer`] forgets a producer when its session ends, and the mapping is
//!   closed (`cuIpcCloseMemHandle`) once no producer and no view holds it. The consumer's
//!   stream waits on the IPC event before the view is handed out. A handle exported by this
//!   very process is recognised and its pointer used directly.
//! - **VMM** ([`Cuda::alloc_vmm`], [`VmmBuffer::export_fd`], [`Cuda::import_vmm_fd`]): an
//!   allocation made with `cuMemCreate` is exported as a POSIX file descriptor
//!   (`cuMemExportToShareableHandle`) to pass with `SCM_RIGHTS` on a Unix socket, which needs
//!   no ptrace rights between the processes; the consumer maps it into its own address range.
//! - **Views** ([`DeviceView`]): pointer, length and device; [`DeviceView::into_dlpack`] makes a
//!   `DLManagedTensorVersioned` of device type `kDLCUDA` whose deleter drops the view, which
//!   runs its release hook (the session's ACK). [`cuda_descriptor`] and
//!   [`Cuda::import_dlpack`] are the same through a SPEC §5.5 DLPACK body whose bytes are a
//!   `cuda-ipc://` URI.
//!
//! Errors are explicit, never a silent fallback: a URI for a device this process cannot see
//! (another device set), a handle that does not open (a peer in another PID/IPC namespace, a
//! freed allocation, garbage), an event that does not open, or a region outside the allocation
//! are `ERR_ATTACHMENT` naming the cause; CUDA missing is an [`Unavailable`] reason (see
//! [`unavailable`]).
//!
//! ```
//! use xcp::attach::cuda::{self, Cuda};
//!
//! match Cuda::load(0) {
//!     Ok(gpu) => println!("device {} ({})", gpu.ordinal(), gpu.uuid_string()),
//!     Err(e) => println!("no CUDA: {}", cuda::unavailable(&e).map_or(e.to_string(), |u| u.to_string())),
//! }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod kernels;

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

use crate::attach::dlpack_ffi::{
    DLDataType, DLDevice, DLManagedTensorVersioned, DLPackVersion, DLTensor,
    DLPACK_FLAG_BITMASK_READ_ONLY,
};
use crate::attach::uri::{AttachmentUri, Target};
use crate::codec::dlpack::{
    data_extent, row_major_strides, DlData, DlDataType, DlpackDescriptor, DEVICE_CUDA, MAX_NDIM,
};
use crate::error::{Error, ErrorCode, Result};

mod dlpack;
mod driver;
mod events;
mod export;
mod import;
mod vmm;

pub use dlpack::*;
pub use driver::*;
pub use events::*;
pub use export::*;
pub use import::*;
pub use vmm::*;

#[cfg(test)]
mod tests;
