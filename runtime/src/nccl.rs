//! The NCCL transport (`docs/parallelism.md`, §5): a rank's collectives (`on_rank`) on its GPU through NCCL,
//! one communicator per group of each mesh axis (the ranks differing only in that axis's coordinate), their
//! unique ids made by rank 0 and passed through the TCP rendezvous. Values go to the device as f64 (exact for
//! the f32, bf16 and integer values the programs hold), so the results equal the simulated transport's up to
//! the order NCCL sums in.
//!
//! `all_reduce`, `all_gather` and `reduce_scatter` map to NCCL's; `all_to_all` and `send_recv` are grouped
//! point-to-point sends and receives. The chunks of a gathered or scattered axis are made contiguous per rank on
//! the host before and put back after.

use crate::ranks::{RankEnv, TcpTransport};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use fulgur_ir::tensor::Buffer;
use fulgur_ir::{Composite, Op, Tensor, Transport};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A rank's communicators, by mesh axis, and one of every rank (the routed exchange's groups, which may span
/// several adjacent mesh axes, talk point to point over it).
pub struct NcclTransport {
    rank: usize,
    mesh: Vec<usize>,
    stream: Arc<CudaStream>,
    comms: Mutex<HashMap<usize, Comm>>,
    world: Mutex<Comm>,
    /// Every rank again, on a stream of its own, for the messages the host waits for ([`NcclTransport::p2p`]:
    /// the routed exchange's counts, and the collectives staged through the host): they never queue behind the
    /// rows still moving on `stream`. Every rank issues its operations on both in its program's order, the
    /// same on every rank (`fulgur::parallel::check_same_collectives`).
    counts_stream: Arc<CudaStream>,
    counts: Mutex<Comm>,
}

// SAFETY: a communicator is used by one collective at a time (behind the mutex), on its own stream
unsafe impl Send for NcclTransport {}
unsafe impl Sync for NcclTransport {}

fn coords(mesh: &[usize], r: usize) -> Vec<usize> {
    let mut c = vec![0; mesh.len()];
    let mut rest = r;
    for i in (0..mesh.len()).rev() {
        c[i] = rest % mesh[i];
        rest /= mesh[i];
    }
    c
}

/// Rank `r`'s group along axis `k`: the index of its group (the other coordinates, row-major) and its place in it.
fn group_of(mesh: &[usize], r: usize, k: usize) -> (usize, usize) {
    let c = coords(mesh, r);
    let mut g = 0;
    for (i, (&ci, &m)) in c.iter().zip(mesh).enumerate() {
        if i != k {
            g = g * m + ci;
        }
    }
    (g, c[k])
}

fn groups(mesh: &[usize], k: usize) -> usize {
    mesh.iter()
        .enumerate()
        .filter(|&(i, _)| i != k)
        .map(|(_, m)| m)
        .product()
}

impl NcclTransport {
    /// The communicators of rank `rank` on `mesh`, from `ids[(axis, group)]`, on GPU `device`.
    pub fn new(
        rank: usize,
        mesh: &[usize],
        ids: &HashMap<(usize, usize), Id>,
        device: usize,
    ) -> Result<NcclTransport, String> {
        let ctx = CudaContext::new(device).map_err(|e| format!("GPU {device}: {e}"))?;
        // communication on a stream of its own, ordered with a program's by events (DeviceCollectives)
        let stream = ctx
            .new_stream()
            .map_err(|e| format!("GPU {device}: a stream for NCCL: {e}"))?;
        let mut comms = HashMap::new();
        // every rank makes its communicators axis by axis, in the same order: no two groups wait on each other
        for (k, &size) in mesh.iter().enumerate() {
            let (g, place) = group_of(mesh, rank, k);
            let id = ids
                .get(&(k, g))
                .ok_or_else(|| format!("no NCCL id for group {g} of mesh axis {k}"))?;
            let comm = Comm::from_rank(stream.clone(), place, size, *id)
                .map_err(|e| format!("NCCL communicator of mesh axis {k} (group {g}, {size} ranks): {e:?}"))?;
            comms.insert(k, comm);
        }
        // the world's communicator last, under the key (mesh axes, 0)
        let ranks: usize = mesh.iter().product();
        let id = ids
            .get(&(mesh.len(), 0))
            .ok_or_else(|| "no NCCL id for the communicator of every rank".to_string())?;
        let world = Comm::from_rank(stream.clone(), rank, ranks, *id)
            .map_err(|e| format!("NCCL communicator of all {ranks} ranks: {e:?}"))?;
        // and the counts' communicator, under (mesh axes + 1, 0)
        let counts_stream = ctx
            .new_stream()
            .map_err(|e| format!("GPU {device}: a stream for NCCL's counts: {e}"))?;
        let id = ids
            .get(&(mesh.len() + 1, 0))
            .ok_or_else(|| "no NCCL id for the counts' communicator".to_string())?;
        let counts = Comm::from_rank(counts_stream.clone(), rank, ranks, *id)
            .map_err(|e| format!("NCCL communicator of all {ranks} ranks for counts: {e:?}"))?;
        Ok(NcclTransport {
            rank,
            mesh: mesh.to_vec(),
            stream,
            comms: Mutex::new(comms),
            world: Mutex::new(world),
            counts_stream,
            counts: Mutex::new(counts),
        })
    }

    /// A job of one rank (every axis of degree 1): its ids made here.
    pub fn single(mesh: &[usize], device: usize) -> Result<NcclTransport, String> {
        if mesh.iter().product::<usize>() != 1 {
            return Err(format!("a single-rank transport on the mesh {mesh:?} of more ranks"));
        }
        let mut ids = HashMap::new();
        for k in 0..=mesh.len() + 1 {
            ids.insert((k, 0), Id::new().map_err(|e| format!("NCCL unique id: {e:?}"))?);
        }
        NcclTransport::new(0, mesh, &ids, device)
    }

    /// Joins a launched job: rank 0 makes a unique id per group of each mesh axis and passes them through the
    /// rendezvous at `MASTER_ADDR:MASTER_PORT`; this rank's communicators on GPU `device`.
    pub fn connect(
        env: &RankEnv,
        mesh: &[usize],
        device: usize,
        timeout: std::time::Duration,
    ) -> Result<NcclTransport, String> {
        if mesh.iter().product::<usize>() != env.world {
            return Err(format!("the mesh {mesh:?} is not {} ranks", env.world));
        }
        let tcp = TcpTransport::connect(env, fulgur_ir::Precision::F32, timeout)?;
        let mut keys: Vec<(usize, usize)> = (0..mesh.len())
            .flat_map(|k| (0..groups(mesh, k)).map(move |g| (k, g)))
            .collect();
        keys.push((mesh.len(), 0));
        keys.push((mesh.len() + 1, 0));
        let bytes = if env.rank == 0 {
            let mut b = Vec::with_capacity(keys.len() * 128);
            for _ in &keys {
                let id = Id::new().map_err(|e| format!("NCCL unique id: {e:?}"))?;
                b.extend(id.internal().iter().map(|&c| c as u8));
            }
            tcp.share(Some(b))?
        } else {
            tcp.share(None)?
        };
        if bytes.len() != keys.len() * 128 {
            return Err(format!("{} bytes of NCCL ids for {} groups", bytes.len(), keys.len()));
        }
        let ids: HashMap<(usize, usize), Id> = keys
            .iter()
            .zip(bytes.chunks_exact(128))
            .map(|(&key, c)| {
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, &s) in internal.iter_mut().zip(c) {
                    *d = s as std::ffi::c_char;
                }
                (key, Id::uninit(internal))
            })
            .collect();
        NcclTransport::new(env.rank, mesh, &ids, device)
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    match &t.data {
        Buffer::F(v) => v.clone(),
        Buffer::I(v) => v.iter().map(|&x| x as f64).collect(),
        Buffer::B(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
    }
}

fn tensor(like: &Tensor, shape: Vec<usize>, v: Vec<f64>) -> Tensor {
    let data = match &like.data {
        Buffer::F(_) => Buffer::F(v),
        Buffer::I(_) => Buffer::I(v.iter().map(|&x| x as i64).collect()),
        Buffer::B(_) => Buffer::B(v.iter().map(|&x| x != 0.0).collect()),
    };
    Tensor {
        dtype: like.dtype,
        shape,
        data,
    }
}

/// `[pre, G·c, post]` (axis `a` of `shape` cut into `g` chunks) → `[G, pre, c, post]`; `back` undoes it.
fn chunks(v: &[f64], shape: &[usize], a: usize, g: usize, back: bool) -> Vec<f64> {
    let pre: usize = shape[..a].iter().product();
    let post: usize = shape[a + 1..].iter().product();
    let c = shape[a] / g;
    let mut out = vec![0.0; v.len()];
    for p in 0..pre {
        for s in 0..g {
            for j in 0..c {
                for q in 0..post {
                    let inner = ((p * g + s) * c + j) * post + q;
                    let outer = ((s * pre + p) * c + j) * post + q;
                    if back {
                        out[inner] = v[outer];
                    } else {
                        out[outer] = v[inner];
                    }
                }
            }
        }
    }
    out
}

impl NcclTransport {
    fn run(&self, op: &Op, x: &Tensor) -> Result<Tensor, String> {
        let err = |e: String| format!("NCCL `{}`: {e}", op.name());
        let (mesh, over) = match op {
            Op::Composite(
                Composite::AllReduce { mesh, over }
                | Composite::AllGather { mesh, over, .. }
                | Composite::ReduceScatter { mesh, over, .. }
                | Composite::AllToAll { mesh, over, .. }
                | Composite::SendRecv { mesh, over, .. },
            ) => (mesh, *over),
            _ => return Err(format!("`{}` is not a collective NCCL runs", op.name())),
        };
        if mesh != &self.mesh {
            return Err(err(format!(
                "the mesh {mesh:?} is not this transport's {:?}",
                self.mesh
            )));
        }
        let g = mesh[over];
        let comms = self.comms.lock().unwrap_or_else(|e| e.into_inner());
        let comm = comms
            .get(&over)
            .ok_or_else(|| err(format!("no communicator for mesh axis {over}")))?;
        let (_, place) = group_of(mesh, self.rank, over);
        let n = x.shape.len();
        let axis_of = |a: i64| -> Result<usize, String> {
            let a = if a < 0 { a + n as i64 + 1 } else { a };
            if a < 1 || a as usize > n {
                return Err(format!("axis {a} of a per-rank value of rank {n}"));
            }
            Ok(a as usize - 1)
        };
        let s = &self.stream;
        let v = values(x);
        let d = |e: cudarc::driver::DriverError| err(e.to_string());
        let nc = |e: cudarc::nccl::result::NcclError| err(format!("{e:?}"));
        let (shape, out) = match op {
            Op::Composite(Composite::AllReduce { .. }) => {
                let send = s.clone_htod(&v).map_err(d)?;
                let mut recv = s.alloc_zeros::<f64>(v.len()).map_err(d)?;
                comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(nc)?;
                (x.shape.clone(), s.clone_dtoh(&recv).map_err(d)?)
            }
            Op::Composite(Composite::AllGather { axis, .. }) => {
                let a = axis_of(*axis)?;
                let send = s.clone_htod(&v).map_err(d)?;
                let mut recv = s.alloc_zeros::<f64>(v.len() * g).map_err(d)?;
                comm.all_gather(&send, &mut recv).map_err(nc)?;
                let mut shape = x.shape.clone();
                shape[a] *= g;
                let got = s.clone_dtoh(&recv).map_err(d)?;
                (shape.clone(), chunks(&got, &shape, a, g, true))
            }
            Op::Composite(Composite::ReduceScatter { axis, .. }) => {
                let a = axis_of(*axis)?;
                if !x.shape[a].is_multiple_of(g) {
                    return Err(err(format!("dim {a} of {:?} is not divisible by {g}", x.shape)));
                }
                let send = s.clone_htod(&chunks(&v, &x.shape, a, g, false)).map_err(d)?;
                let mut recv = s.alloc_zeros::<f64>(v.len() / g).map_err(d)?;
                comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum).map_err(nc)?;
                let mut shape = x.shape.clone();
                shape[a] /= g;
                (shape, s.clone_dtoh(&recv).map_err(d)?)
            }
            Op::Composite(Composite::AllToAll { axis, .. }) => {
                let a = axis_of(*axis)?;
                if !x.shape[a].is_multiple_of(g) {
                    return Err(err(format!("dim {a} of {:?} is not divisible by {g}", x.shape)));
                }
                let block = v.len() / g;
                let host = chunks(&v, &x.shape, a, g, false);
                let sends = (0..g)
                    .map(|p| s.clone_htod(&host[p * block..(p + 1) * block]))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(d)?;
                let mut recvs = (0..g)
                    .map(|_| s.alloc_zeros::<f64>(block))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(d)?;
                {
                    let mut grp = comm.group();
                    for (p, (sd, rv)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
                        grp.send(sd.as_view(), p as i32).map_err(nc)?;
                        grp.recv(rv.as_view_mut(), p as i32).map_err(nc)?;
                    }
                }
                let mut got = Vec::with_capacity(v.len());
                for rv in &recvs {
                    got.extend(s.clone_dtoh(rv).map_err(d)?);
                }
                (x.shape.clone(), chunks(&got, &x.shape, a, g, true))
            }
            Op::Composite(Composite::SendRecv { shift, .. }) => {
                let k = shift.rem_euclid(g as i64) as usize;
                let to = (place + k) % g;
                let from = (place + g - k) % g;
                let send = s.clone_htod(&v).map_err(d)?;
                let mut recv = s.alloc_zeros::<f64>(v.len()).map_err(d)?;
                {
                    let mut grp = comm.group();
                    grp.send(send.as_view(), to as i32).map_err(nc)?;
                    grp.recv(recv.as_view_mut(), from as i32).map_err(nc)?;
                }
                (x.shape.clone(), s.clone_dtoh(&recv).map_err(d)?)
            }
            _ => unreachable!("matched above"),
        };
        s.synchronize().map_err(d)?;
        Ok(tensor(x, shape, out))
    }
}

impl NcclTransport {
    /// Point-to-point over the counts' communicator of every rank (on its own stream, so that a host waiting
    /// for these values does not wait for the rows still moving on the collectives' stream), as one NCCL
    /// group: `sends` (peer, values) and `recvs` (peer, length); empty messages are skipped (both sides know
    /// the lengths). Returns what was received, in the order of `recvs`.
    fn p2p(&self, sends: &[(usize, Vec<f64>)], recvs: &[(usize, usize)]) -> Result<Vec<Vec<f64>>, String> {
        let s = &self.counts_stream;
        let d = |e: cudarc::driver::DriverError| e.to_string();
        let nc = |e: cudarc::nccl::result::NcclError| format!("{e:?}");
        let up = sends
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(p, v)| s.clone_htod(v).map(|b| (*p, b)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(d)?;
        let mut down = recvs
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|&(p, n)| s.alloc_zeros::<f64>(n).map(|b| (p, b)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(d)?;
        {
            let world = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let views: Vec<_> = up.iter().map(|(p, b)| (*p, b.as_view())).collect();
            let mut sinks: Vec<_> = down.iter_mut().map(|(p, b)| (*p, b.as_view_mut())).collect();
            let mut grp = world.group();
            for (p, v) in views {
                grp.send(v, p as i32).map_err(nc)?;
            }
            for (p, v) in sinks.drain(..) {
                grp.recv(v, p as i32).map_err(nc)?;
            }
        }
        let mut got = Vec::with_capacity(recvs.len());
        let mut it = down.into_iter();
        for &(_, n) in recvs {
            if n == 0 {
                got.push(Vec::new());
            } else {
                let (_, b) = it.next().expect("one buffer per non-empty receive");
                got.push(s.clone_dtoh(&b).map_err(d)?);
            }
        }
        s.synchronize().map_err(d)?;
        Ok(got)
    }

    /// The routed exchange (`all_to_all_dispatch`, `all_to_all_combine`) within this rank's group of the op's
    /// own mesh (its axes may merge several of the plan's): the members' counts first, then only the routed
    /// rows, each to the member holding its expert (and back).
    fn exchange(
        &self,
        op: &Op,
        mesh: &[usize],
        over: usize,
        x: &Tensor,
        counts: &Tensor,
    ) -> Result<Vec<Tensor>, String> {
        let err = |e: String| format!("NCCL `{}`: {e}", op.name());
        if mesh.iter().product::<usize>() != self.mesh.iter().product::<usize>() || over >= mesh.len() {
            return Err(err(format!(
                "the mesh {mesh:?} (over {over}) is not one of this transport's {:?} ranks",
                self.mesh
            )));
        }
        let mine: Vec<i64> = values(counts).iter().map(|&c| c as i64).collect();
        let Group { members, me, el, all } = self.group_counts(mesh, over, mine).map_err(err)?;
        let (gs, e, mine) = (members.len(), el * members.len(), all[me].clone());
        let width: usize = x.shape[1..].iter().product();
        let v = values(x);
        let rows_of = |c: &[i64], lo: usize, hi: usize| -> usize { c[lo..hi].iter().sum::<i64>().max(0) as usize };
        match op {
            Op::Composite(Composite::AllToAllDispatch { .. }) => {
                let m = x.shape[0];
                if rows_of(&mine, 0, e) > m {
                    return Err(err(format!(
                        "the counts sum to {} but there are {m} rows",
                        rows_of(&mine, 0, e)
                    )));
                }
                // to member d: my rows of its experts, contiguous
                let sends: Vec<(usize, Vec<f64>)> = members
                    .iter()
                    .enumerate()
                    .map(|(d, &p)| {
                        let (start, len) = (rows_of(&mine, 0, d * el), rows_of(&mine, d * el, (d + 1) * el));
                        (p, v[start * width..(start + len) * width].to_vec())
                    })
                    .collect();
                let recvs: Vec<(usize, usize)> = members
                    .iter()
                    .enumerate()
                    .map(|(s, &p)| (p, rows_of(&all[s], me * el, (me + 1) * el) * width))
                    .collect();
                let got = self.p2p(&sends, &recvs).map_err(err)?;
                // laid out by (expert, sender), padded with zeros
                let mut y = vec![0.0; gs * m * width];
                let mut q = 0;
                let mut per_expert = vec![0i64; el];
                for j in 0..el {
                    for (s, block) in got.iter().enumerate() {
                        let at = rows_of(&all[s], me * el, me * el + j);
                        let n = all[s][me * el + j] as usize;
                        y[q * width..(q + n) * width].copy_from_slice(&block[at * width..(at + n) * width]);
                        q += n;
                        per_expert[j] += n as i64;
                    }
                }
                let mut shape = x.shape.clone();
                shape[0] = gs * m;
                let got_counts = Tensor::from_i64(fulgur_ir::DType::I64, vec![el], per_expert);
                Ok(vec![tensor(x, shape, y), got_counts])
            }
            _ => {
                let gm = x.shape[0];
                if !gm.is_multiple_of(gs) {
                    return Err(err(format!("{gm} rows are not a group of {gs} blocks")));
                }
                let m = gm / gs;
                // the received rows back to their senders: member s's, expert by expert
                let mut back: Vec<Vec<f64>> = vec![Vec::new(); gs];
                let mut q = 0;
                let mut spans = vec![Vec::new(); gs];
                for j in 0..el {
                    for (s, c) in all.iter().enumerate() {
                        let n = c[me * el + j] as usize;
                        spans[s].push((q, n));
                        q += n;
                    }
                }
                if q > gm {
                    return Err(err(format!("the members' counts route {q} rows to {gm}")));
                }
                for (s, sp) in spans.iter().enumerate() {
                    for &(at, n) in sp {
                        back[s].extend_from_slice(&v[at * width..(at + n) * width]);
                    }
                }
                let sends: Vec<(usize, Vec<f64>)> = members.iter().zip(back).map(|(&p, b)| (p, b)).collect();
                let recvs: Vec<(usize, usize)> = members
                    .iter()
                    .enumerate()
                    .map(|(d, &p)| (p, rows_of(&mine, d * el, (d + 1) * el) * width))
                    .collect();
                let got = self.p2p(&sends, &recvs).map_err(err)?;
                if rows_of(&mine, 0, e) > m {
                    return Err(err(format!(
                        "the counts sum to {} but there are {m} rows",
                        rows_of(&mine, 0, e)
                    )));
                }
                let mut out = vec![0.0; m * width];
                for (d, block) in got.iter().enumerate() {
                    let start = rows_of(&mine, 0, d * el);
                    out[start * width..start * width + block.len()].copy_from_slice(block);
                }
                let mut shape = x.shape.clone();
                shape[0] = m;
                Ok(vec![tensor(x, shape, out)])
            }
        }
    }
}

/// A routed exchange's group, as one rank sees it: the members' global ranks, this rank's place among them, the
/// experts each member holds, and every member's counts (its rows per expert).
struct Group {
    members: Vec<usize>,
    me: usize,
    el: usize,
    all: Vec<Vec<i64>>,
}

impl NcclTransport {
    /// This rank's group of the routed exchange on `mesh` along `over` (its members differ from it only in that
    /// coordinate), with every member's counts exchanged (this rank's are `mine`); negative counts refused.
    fn group_counts(&self, mesh: &[usize], over: usize, mine: Vec<i64>) -> Result<Group, String> {
        if mesh.iter().product::<usize>() != self.mesh.iter().product::<usize>() || over >= mesh.len() {
            return Err(format!(
                "the mesh {mesh:?} (over {over}) is not one of this transport's {:?} ranks",
                self.mesh
            ));
        }
        let (_, me) = group_of(mesh, self.rank, over);
        let gs = mesh[over];
        let stride: usize = mesh[over + 1..].iter().product();
        let members: Vec<usize> = (0..gs).map(|i| self.rank - me * stride + i * stride).collect();
        let e = mine.len();
        if !e.is_multiple_of(gs) {
            return Err(format!("{e} experts cannot be shared by a group of {gs} ranks"));
        }
        let as_f64: Vec<f64> = mine.iter().map(|&c| c as f64).collect();
        let sends: Vec<(usize, Vec<f64>)> = members.iter().map(|&p| (p, as_f64.clone())).collect();
        let recvs: Vec<(usize, usize)> = members.iter().map(|&p| (p, e)).collect();
        let all: Vec<Vec<i64>> = self
            .p2p(&sends, &recvs)?
            .into_iter()
            .map(|v| v.into_iter().map(|c| c as i64).collect())
            .collect();
        for (s, c) in all.iter().enumerate() {
            if let Some(n) = c.iter().find(|&&n| n < 0) {
                return Err(format!("member {s} of the group sends a negative count {n}"));
            }
        }
        Ok(Group {
            members,
            me,
            el: e / gs,
            all,
        })
    }

    /// The routed exchange on device memory: the counts read back once the program's stream has computed them
    /// (the host's wait) and exchanged on the counts' communicator (which no transfer of rows delays), `got`
    /// written, then every expert's rows sent straight from `x`'s buffer into their place in the receiver's,
    /// one message per (expert, member) segment on the communication stream, the padding zeroed there. Nothing
    /// waits for the rows' transfer but the kernels that read them ([`crate::cuda`]'s pending collectives;
    /// and the host, where the buffer plan put the output over the input and the rows are sent from a copy),
    /// so the next chunk's exchange and the experts of the chunks received overlap it (`docs/parallelism.md`
    /// §4.2).
    ///
    /// # Safety
    /// As [`crate::cuda::DeviceCollectives::run`].
    unsafe fn exchange_on_device(
        &self,
        op: &Op,
        ins: &[crate::cuda::DeviceOperand],
        outs: &[crate::cuda::DeviceOperand],
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<cudarc::driver::sys::CUevent, String> {
        use cudarc::driver::result as drv;
        use cudarc::driver::sys;
        use fulgur_ir::DType;
        let (mesh, over, dispatch) = match op {
            Op::Composite(Composite::AllToAllDispatch { mesh, over, .. }) => (mesh, *over, true),
            Op::Composite(Composite::AllToAllCombine { mesh, over, .. }) => (mesh, *over, false),
            _ => return Err(format!("`{}` is not the routed exchange", op.name())),
        };
        let [x, counts] = ins else {
            return Err("the routed exchange takes rows and counts".into());
        };
        let d = |e: cudarc::driver::DriverError| e.to_string();
        // the counts, once the program has computed them
        let ready = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(d)?;
        let result = (|| {
            unsafe { drv::event::record(ready, stream) }.map_err(d)?;
            unsafe { drv::event::synchronize(ready) }.map_err(d)?;
            let e = counts.shape.iter().product::<usize>();
            let es = counts.dtype.size_bytes();
            let mut raw = vec![0u8; e * es];
            unsafe { drv::memcpy_dtoh_sync(&mut raw, counts.ptr) }.map_err(d)?;
            let mine: Vec<i64> = raw
                .chunks(es)
                .map(|c| match counts.dtype {
                    DType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                    _ => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
                })
                .collect();
            let Group { members, me, el, all } = self.group_counts(mesh, over, mine)?;
            let gs = members.len();
            let row = x.shape[1..].iter().product::<usize>() * x.dtype.size_bytes();
            let off = |c: &[i64], hi: usize| c[..hi].iter().sum::<i64>() as usize;
            // (peer, byte offset, bytes): sends from `x`, receives into the output, in the order both sides
            // agree on (per pair of ranks: expert by expert)
            let (mut sends, mut recvs) = (Vec::new(), Vec::new());
            let mut q = 0usize;
            let y = &outs[0];
            let (rows_in, rows_out) = (x.shape[0], y.shape[0]);
            let sent: usize = off(&all[me], all[me].len());
            if dispatch {
                if sent > rows_in {
                    return Err(format!("the counts sum to {sent} but there are {rows_in} rows"));
                }
                for (dst, &p) in members.iter().enumerate() {
                    for j in 0..el {
                        let ex = dst * el + j;
                        sends.push((p, off(&all[me], ex) * row, all[me][ex] as usize * row));
                    }
                }
                for j in 0..el {
                    for (src, &p) in members.iter().enumerate() {
                        let n = all[src][me * el + j] as usize;
                        recvs.push((p, q * row, n * row));
                        q += n;
                    }
                }
            } else {
                for j in 0..el {
                    for (src, &p) in members.iter().enumerate() {
                        let n = all[src][me * el + j] as usize;
                        sends.push((p, q * row, n * row));
                        q += n;
                    }
                }
                if q > rows_in || sent > rows_out {
                    return Err(format!(
                        "the counts route {q} rows to {rows_in} and {sent} back to {rows_out}"
                    ));
                }
                for (src, &p) in members.iter().enumerate() {
                    for j in 0..el {
                        let ex = src * el + j;
                        recvs.push((p, off(&all[me], ex) * row, all[me][ex] as usize * row));
                    }
                }
            }
            let filled = if dispatch { q } else { sent };
            if dispatch && q > rows_out {
                return Err(format!(
                    "the members route {q} rows here, past the {rows_out} rows of the buffer"
                ));
            }
            if dispatch {
                // `got` now, on the program's stream, which is through (`ready`): its readers are ordered after
                // the copy by that stream, and the host waits for the copy alone (its bytes must outlive it)
                // rather than for the rows' transfer after it. (A synchronous copy from pageable memory may
                // return before it lands, and the default stream orders nothing with the program's.)
                let got: Vec<u8> = (0..el)
                    .flat_map(|j| (0..gs).map(|src| all[src][me * el + j]).sum::<i64>().to_le_bytes())
                    .collect();
                unsafe { drv::memcpy_htod_async(outs[1].ptr, &got, stream) }.map_err(d)?;
                unsafe { drv::stream::synchronize(stream) }.map_err(d)?;
            }
            let comm_stream = self.stream.cu_stream();
            unsafe { drv::stream::wait_event(comm_stream, ready, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(d)?;
            let s = &self.stream;
            // a buffer plan may place the output over the input: then the rows are sent from a copy
            let (x_bytes, y_bytes) = (rows_in * row, rows_out * row);
            let overlap = x_bytes > 0 && x.ptr < y.ptr + y_bytes as u64 && y.ptr < x.ptr + x_bytes as u64;
            let copy = if overlap {
                let c = unsafe { drv::malloc_sync(x_bytes) }.map_err(d)?;
                unsafe { drv::memcpy_dtod_async(c, x.ptr, x_bytes, comm_stream) }.map_err(d)?;
                Some(c)
            } else {
                None
            };
            let from = copy.unwrap_or(x.ptr);
            let wrap = |base: u64, (p, at, n): (usize, usize, usize)| {
                (p, unsafe { s.upgrade_device_ptr::<u8>(base + at as u64, n) })
            };
            let src_bufs: Vec<_> = sends.iter().filter(|m| m.2 > 0).map(|&m| wrap(from, m)).collect();
            let mut dst_bufs: Vec<_> = recvs.iter().filter(|m| m.2 > 0).map(|&m| wrap(y.ptr, m)).collect();
            let res = {
                let world = self.world.lock().unwrap_or_else(|e| e.into_inner());
                let views: Vec<_> = src_bufs.iter().map(|(p, b)| (*p, b.as_view())).collect();
                let sinks: Vec<_> = dst_bufs.iter_mut().map(|(p, b)| (*p, b.as_view_mut())).collect();
                let mut grp = world.group();
                let mut r = Ok(());
                for (p, v) in views {
                    r = r.and(grp.send(v, p as i32).map(|_| ()));
                }
                for (p, v) in sinks {
                    r = r.and(grp.recv(v, p as i32).map(|_| ()));
                }
                drop(grp);
                r
            };
            for (_, b) in src_bufs.into_iter().chain(dst_bufs) {
                b.leak();
            }
            if let Some(c) = copy {
                // the sends have read the copy once the stream is through them
                let synced = self.stream.synchronize().map_err(d);
                unsafe {
                    let _ = drv::free_sync(c);
                }
                synced?;
            }
            res.map_err(|e| format!("{e:?}"))?;
            // the rows no member filled are zero
            if filled < rows_out {
                unsafe {
                    drv::memset_d8_async(y.ptr + (filled * row) as u64, 0, (rows_out - filled) * row, comm_stream)
                }
                .map_err(d)?;
            }
            let done = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(d)?;
            match unsafe { drv::event::record(done, comm_stream) } {
                Ok(()) => Ok(done),
                Err(e) => {
                    unsafe {
                        let _ = drv::event::destroy(done);
                    }
                    Err(d(e))
                }
            }
        })();
        unsafe {
            let _ = drv::event::destroy(ready);
        }
        result
    }
}

impl Transport for NcclTransport {
    fn collective(&self, op: &Op, rank: usize, args: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        if rank != self.rank {
            return Err(format!("rank {} was asked for rank {rank}'s collective", self.rank));
        }
        if let Op::Composite(
            Composite::AllToAllDispatch { mesh, over, .. } | Composite::AllToAllCombine { mesh, over, .. },
        ) = op
        {
            let [x, counts] = args else {
                return Err(format!(
                    "`{}` takes rows and counts, got {} inputs",
                    op.name(),
                    args.len()
                ));
            };
            return self.exchange(op, mesh, *over, x, counts);
        }
        let [x] = args else {
            return Err(format!("`{}` takes one input, got {}", op.name(), args.len()));
        };
        Ok(vec![self.run(op, x)?])
    }

    fn as_any(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        Some(self)
    }
}

/// The per-rank axis (0-based, in the rank's shape of `rank` dims) of a collective's `axis` (which counts the
/// rank axis of the simulated graph).
fn per_rank_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 + 1 } else { axis };
    (1..=rank as i64).contains(&a).then(|| a as usize - 1)
}

/// `op` as NCCL calls on the transport's stream, on device memory wrapped (not owned) as `T` slices.
///
/// # Safety
/// The operands are live device allocations of the transport's context, `len` elements of `T` each.
unsafe fn device_call<T: cudarc::nccl::NcclType>(
    t: &NcclTransport,
    op: &Op,
    comm: &Comm,
    x: (u64, usize),
    y: (u64, usize),
) -> Result<(), String> {
    let nc = |e: cudarc::nccl::result::NcclError| format!("{e:?}");
    let s = &t.stream;
    let send = unsafe { s.upgrade_device_ptr::<T>(x.0, x.1) };
    let mut recv = unsafe { s.upgrade_device_ptr::<T>(y.0, y.1) };
    let (_, place) = group_of(&t.mesh, t.rank, group_axis(op));
    let g = comm.world_size();
    let res = match op {
        Op::Composite(Composite::AllReduce { .. }) => comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map(|_| ()),
        Op::Composite(Composite::AllGather { .. }) => comm.all_gather(&send, &mut recv).map(|_| ()),
        Op::Composite(Composite::ReduceScatter { .. }) => {
            comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum).map(|_| ())
        }
        Op::Composite(Composite::AllToAll { .. }) => {
            let block = x.1 / g;
            let size = std::mem::size_of::<T>() as u64;
            // each destination's chunk of the output, wrapped on its own (released, not freed, after)
            let mut sinks: Vec<cudarc::driver::CudaSlice<T>> = (0..g)
                .map(|p| unsafe { s.upgrade_device_ptr::<T>(y.0 + (p * block) as u64 * size, block) })
                .collect();
            let views: Vec<_> = (0..g).map(|p| send.slice(p * block..(p + 1) * block)).collect();
            let outs: Vec<_> = sinks.iter_mut().map(|c| c.as_view_mut()).collect();
            let mut grp = comm.group();
            let mut r = Ok(());
            for (p, v) in views.into_iter().enumerate() {
                r = r.and(grp.send(v, p as i32).map(|_| ()));
            }
            for (p, v) in outs.into_iter().enumerate() {
                r = r.and(grp.recv(v, p as i32).map(|_| ()));
            }
            drop(grp);
            for c in sinks {
                c.leak();
            }
            r
        }
        Op::Composite(Composite::SendRecv { shift, .. }) => {
            let k = shift.rem_euclid(g as i64) as usize;
            let (to, from) = ((place + k) % g, (place + g - k) % g);
            let mut grp = comm.group();
            let r = grp
                .send(send.as_view(), to as i32)
                .map(|_| ())
                .and(grp.recv(recv.as_view_mut(), from as i32).map(|_| ()));
            drop(grp);
            r
        }
        _ => Ok(()),
    };
    send.leak();
    recv.leak();
    res.map_err(nc)
}

/// The mesh axis a collective's group runs along.
fn group_axis(op: &Op) -> usize {
    match op {
        Op::Composite(
            Composite::AllReduce { over, .. }
            | Composite::AllGather { over, .. }
            | Composite::ReduceScatter { over, .. }
            | Composite::AllToAll { over, .. }
            | Composite::SendRecv { over, .. },
        ) => *over,
        _ => 0,
    }
}

/// Whether a transport on `mesh` runs `op` on the device for these operands: `all_reduce` and `send_recv` of
/// any layout, `all_gather`, `reduce_scatter` and `all_to_all` along a per-rank axis with nothing but size-1
/// axes before it (their chunks then lie whole in memory, rank after rank), on the transport's own mesh; NCCL's
/// own types for the sums (f32, bf16, f16, i32, i64). The routed exchange and the rest go through the host.
fn device_form(tmesh: &[usize], op: &Op, ins: &[(fulgur_ir::DType, Vec<usize>)]) -> bool {
    use fulgur_ir::DType;
    if let (
        Op::Composite(Composite::AllToAllDispatch { mesh, .. } | Composite::AllToAllCombine { mesh, .. }),
        [(_, x), (ct, _)],
    ) = (op, ins)
    {
        // over the communicator of every rank: any mesh of this many ranks; rows of at least one dim
        return mesh.iter().product::<usize>() == tmesh.iter().product::<usize>()
            && !x.is_empty()
            && matches!(ct, DType::I32 | DType::I64);
    }
    let [(dt, shape)] = ins else { return false };
    let Op::Composite(c) = op else { return false };
    let mesh = match c {
        Composite::AllReduce { mesh, .. }
        | Composite::AllGather { mesh, .. }
        | Composite::ReduceScatter { mesh, .. }
        | Composite::AllToAll { mesh, .. }
        | Composite::SendRecv { mesh, .. } => mesh,
        _ => return false,
    };
    if mesh != tmesh {
        return false;
    }
    let summed = matches!(dt, DType::F32 | DType::BF16 | DType::F16 | DType::I32 | DType::I64);
    let leading = |axis: i64, divides: bool| {
        per_rank_axis(axis, shape.len()).is_some_and(|a| {
            shape[..a].iter().product::<usize>() == 1 && (!divides || shape[a].is_multiple_of(tmesh[group_axis(op)]))
        })
    };
    match c {
        Composite::AllReduce { .. } => summed,
        Composite::SendRecv { .. } => true,
        Composite::AllGather { axis, .. } => leading(*axis, false),
        Composite::AllToAll { axis, .. } => leading(*axis, true),
        Composite::ReduceScatter { axis, .. } => summed && leading(*axis, true),
        _ => false,
    }
}

impl crate::cuda::DeviceCollectives for NcclTransport {
    fn on_device(&self, op: &Op, ins: &[(fulgur_ir::DType, Vec<usize>)]) -> bool {
        device_form(&self.mesh, op, ins)
    }

    unsafe fn run(
        &self,
        op: &Op,
        rank: usize,
        ins: &[crate::cuda::DeviceOperand],
        outs: &[crate::cuda::DeviceOperand],
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<cudarc::driver::sys::CUevent, String> {
        use cudarc::driver::result as drv;
        use cudarc::driver::sys;
        use fulgur_ir::DType;
        if rank != self.rank {
            return Err(format!("rank {} was asked for rank {rank}'s collective", self.rank));
        }
        if matches!(
            op,
            Op::Composite(Composite::AllToAllDispatch { .. } | Composite::AllToAllCombine { .. })
        ) {
            return unsafe { self.exchange_on_device(op, ins, outs, stream) };
        }
        let ([x], [y]) = (ins, outs) else {
            return Err(format!("`{}` on the device takes one input and one output", op.name()));
        };
        let d = |e: cudarc::driver::DriverError| e.to_string();
        let comms = self.comms.lock().unwrap_or_else(|e| e.into_inner());
        let comm = comms
            .get(&group_axis(op))
            .ok_or_else(|| format!("no communicator for mesh axis {}", group_axis(op)))?;
        // the communication stream waits for the program's work so far
        let ready = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(d)?;
        let done = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(d)?;
        let comm_stream = self.stream.cu_stream();
        let result = (|| {
            unsafe { drv::event::record(ready, stream) }.map_err(d)?;
            unsafe { drv::stream::wait_event(comm_stream, ready, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(d)?;
            let n = |o: &crate::cuda::DeviceOperand| o.shape.iter().product::<usize>();
            let summing = matches!(
                op,
                Op::Composite(Composite::AllReduce { .. } | Composite::ReduceScatter { .. })
            );
            let (xs, ys) = ((x.ptr, n(x)), (y.ptr, n(y)));
            let bytes = |(p, k): (u64, usize)| (p, k * x.dtype.size_bytes());
            unsafe {
                match (summing, x.dtype) {
                    (true, DType::F32) => device_call::<f32>(self, op, comm, xs, ys),
                    (true, DType::BF16) => device_call::<half::bf16>(self, op, comm, xs, ys),
                    (true, DType::F16) => device_call::<half::f16>(self, op, comm, xs, ys),
                    (true, DType::I32) => device_call::<i32>(self, op, comm, xs, ys),
                    (true, DType::I64) => device_call::<i64>(self, op, comm, xs, ys),
                    (true, dt) => Err(format!("NCCL does not sum {dt}")),
                    // data moved, not summed: as bytes
                    (false, _) => device_call::<u8>(self, op, comm, bytes(xs), bytes(ys)),
                }
            }?;
            // the program waits for this event before it touches the operands
            unsafe { drv::event::record(done, comm_stream) }.map_err(d)
        })();
        // SAFETY: an event waited on is released once its work completes; `done` goes to the program
        unsafe {
            let _ = drv::event::destroy(ready);
        }
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                unsafe {
                    let _ = drv::event::destroy(done);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_move_a_cut_axis_first_and_back() {
        // shape [2, 4, 3] cut along axis 1 into 2 chunks of 2
        let v: Vec<f64> = (0..24).map(f64::from).collect();
        let f = chunks(&v, &[2, 4, 3], 1, 2, false);
        // chunk 0 of both rows first: rows 0 and 1, positions 0..2 of axis 1
        assert_eq!(&f[..12], &[0., 1., 2., 3., 4., 5., 12., 13., 14., 15., 16., 17.]);
        assert_eq!(chunks(&f, &[2, 4, 3], 1, 2, true), v);
        assert_eq!(group_of(&[2, 3], 4, 1), (1, 1));
        assert_eq!(group_of(&[2, 3], 4, 0), (1, 1));
        assert_eq!(groups(&[2, 3], 0), 3);
    }

    #[test]
    fn the_device_takes_collectives_whose_chunks_lie_whole() {
        use fulgur_ir::DType;
        let mesh = vec![2usize, 2];
        let on =
            |c: Composite, dt: DType, shape: &[usize]| device_form(&mesh, &Op::Composite(c), &[(dt, shape.to_vec())]);
        let m = mesh.clone();
        assert!(on(
            Composite::AllReduce {
                mesh: m.clone(),
                over: 1
            },
            DType::BF16,
            &[3, 5]
        ));
        assert!(
            !on(
                Composite::AllReduce {
                    mesh: m.clone(),
                    over: 1
                },
                DType::Bool,
                &[3, 5]
            ),
            "NCCL sums no bools"
        );
        assert!(on(
            Composite::AllGather {
                axis: 1,
                mesh: m.clone(),
                over: 0
            },
            DType::Bool,
            &[3, 5]
        ));
        assert!(on(
            Composite::AllGather {
                axis: 2,
                mesh: m.clone(),
                over: 0
            },
            DType::F32,
            &[1, 5]
        ));
        assert!(!on(
            Composite::AllGather {
                axis: 2,
                mesh: m.clone(),
                over: 0
            },
            DType::F32,
            &[3, 5]
        ));
        assert!(on(
            Composite::ReduceScatter {
                axis: -2,
                mesh: m.clone(),
                over: 1
            },
            DType::F32,
            &[4, 5]
        ));
        assert!(!on(
            Composite::ReduceScatter {
                axis: -2,
                mesh: m.clone(),
                over: 1
            },
            DType::F32,
            &[3, 5]
        ));
        assert!(on(
            Composite::AllToAll {
                axis: 1,
                mesh: m.clone(),
                over: 0
            },
            DType::I64,
            &[2, 7]
        ));
        assert!(on(
            Composite::SendRecv {
                shift: 1,
                mesh: m.clone(),
                over: 0
            },
            DType::F32,
            &[3, 5]
        ));
        assert!(
            !on(Composite::AllReduce { mesh: vec![4], over: 0 }, DType::F32, &[3]),
            "another mesh"
        );
        let routed = Composite::dispatch(m.clone(), 1);
        assert!(
            !on(routed, DType::F32, &[3, 5]),
            "the routed exchange goes through the host"
        );
        assert_eq!(per_rank_axis(-1, 2), Some(1));
        assert_eq!(per_rank_axis(1, 2), Some(0));
        assert_eq!(per_rank_axis(0, 2), None);
    }
}
