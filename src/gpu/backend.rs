//! The [`Backend`] on wgpu: each kernel family's launches, recorded into a [`Batch`] and
//! submitted together. Launch sequences:
//! - training statistics: stats_partials (per chunk) → stats_finalize (saved, running update);
//!   [`moments`](Backend::moments) stops at the merged summaries, and
//!   [`gather`](Backend::gather) merges several parts' summaries with the same finalize;
//! - inference statistics: stats_running;
//! - normalize: apply (per chunk);
//! - backward: bwd_partials (per chunk) → bwd_finalize (dγ, dβ, and the dx coefficients or
//!   the sums) → bwd_dx (per chunk).
//!
//! A layer's training forward is therefore 3 launches (x read twice, y written once) and its
//! backward 3 (x and dy read twice, dx written once), in one submission each.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::context::{GpuContext, Scope};
use super::kernels::{
    encode, Bind, Family, Launch, Params, FLAG_BIAS, FLAG_DBIAS, FLAG_DWEIGHT, FLAG_DX, FLAG_DZ,
    FLAG_MOMENTS, FLAG_RELU, FLAG_RESIDUAL, FLAG_SAVED, FLAG_SUMS, FLAG_TRAINING,
    FLAG_UPDATE_RUNNING, FLAG_WEIGHT, WORKGROUP_SIZE,
};
use super::plan::{per_channel, Plan};
use super::pool::GpuBuffer;
use crate::backend::{
    stats_then_elemt, Backend, Batch, Epilogue, EpilogueGrad, Grads, Reduced, Running, Step,
    Summaries,
};
use crate::context::{Data, Tensor};
use crate::dtype::DType;
use crate::error::Result;

/// The units of the kernels that touch no tensor data (finalize, running statistics) and of
/// the f32-only one-pass kernels.
const PER_CHANNEL: (bool, DType) = (false, DType::F32);

fn buffer(t: &Tensor) -> &Arc<GpuBuffer> {
    match &t.data {
        Data::Gpu(b) => b,
        Data::Cpu(_) => unreachable!("the op layer checks contexts: host data on a GPU backend"),
    }
}

/// A per-channel tensor's values: its own range of its buffer.
fn bind(t: &Tensor) -> Bind {
    let b = buffer(t);
    Bind::owned(b, Some((b.offset, (t.numel() * 4) as u64)))
}

fn data_buffer(d: &Data) -> &Arc<GpuBuffer> {
    match d {
        Data::Gpu(b) => b,
        Data::Cpu(_) => unreachable!("the op layer checks contexts: host data on a GPU backend"),
    }
}

fn summaries(s: &Summaries) -> &Arc<GpuBuffer> {
    match s {
        Summaries::Gpu(b) => b,
        Summaries::Cpu(_) => unreachable!("the op layer checks contexts"),
    }
}

fn gpu(b: Arc<GpuBuffer>) -> Data {
    Data::Gpu(b)
}

impl GpuContext {
    fn launch(
        &self,
        batch: &mut Batch,
        family: Family,
        (vec4, dtype): (bool, DType),
        params: Params,
        buffers: Vec<Bind>,
    ) {
        batch.steps.push(Step::Launch(Launch {
            family,
            vec4,
            dtype,
            params,
            buffers,
        }));
    }

    /// The buffer of an optional per-channel input (γ, β), or the read dummy.
    fn or_dummy(&self, t: Option<&Tensor>) -> Bind {
        t.map_or_else(|| (&self.dummy_read).into(), bind)
    }

    /// The buffer of a running statistic, to be written in place: a tensor whose storage
    /// is shared with a clone is first copied to fresh storage (copy-on-write).
    fn writable(&self, batch: &mut Batch, t: &mut Tensor) -> Result<Bind> {
        let Data::Gpu(b) = &t.data else {
            unreachable!("the op layer checks contexts")
        };
        if Arc::strong_count(b) == 1 {
            return Ok(bind(t));
        }
        let len = t.numel();
        let fresh = Arc::new(self.alloc(len, "running statistics"));
        batch.steps.push(Step::Copy {
            src: b.clone(),
            src_offset: b.offset,
            dst: fresh.clone(),
            dst_offset: 0,
            bytes: (len * 4) as u64,
        });
        t.data = gpu(fresh);
        Ok(bind(t))
    }

    /// Binds for the running statistics and the flags and parameters of their update.
    fn running_binds(
        &self,
        batch: &mut Batch,
        running: Option<Running<'_>>,
        count: u64,
        params: &mut Params,
    ) -> Result<[Bind; 2]> {
        match running {
            Some(r) if count > 0 => {
                params.flags |= FLAG_UPDATE_RUNNING;
                params.momentum = r.momentum;
                params.bessel = (count as f64 / (count as f64 - 1.0)) as f32;
                Ok([self.writable(batch, r.mean)?, self.writable(batch, r.var)?])
            }
            _ => Ok([(&self.dummy_write).into(), (&self.dummy_write).into()]),
        }
    }

    /// Buffers for an operation's outputs and scratch (under the batch's error scope).
    fn buffers<const N: usize>(&self, lens: [usize; N]) -> Result<[Arc<GpuBuffer>; N]> {
        Ok(lens.map(|len| Arc::new(self.alloc(len, "batchnorm"))))
    }

    /// The statistics partials of x into a scratch buffer; returns the plan and the
    /// partials, or None for an empty tensor.
    fn stats_partials(
        &self,
        batch: &mut Batch,
        x: &Tensor,
    ) -> Result<Option<(Plan, Arc<GpuBuffer>)>> {
        let plan = self.plan(x.shape().view(), x.dtype())?;
        if plan.is_empty() {
            return Ok(None);
        }
        plan.check_reducible()?;
        let [partials] = self.buffers([plan.partials_len()])?;
        let family = plan.pick(Family::StatsPartials, Family::StatsPartialsCols);
        for chunk in plan.chunk_list() {
            let binds = vec![plan.part(buffer(x), &chunk), plan.partials(&partials)];
            self.launch(batch, family, plan.units(), plan.reduce(&chunk), binds);
        }
        Ok(Some((plan, partials)))
    }

    /// The backward partials of (x, dy) into a scratch buffer; dy masked by
    /// `relu_y` > 0 where given, and the masked dy written to `dz` where given.
    #[allow(clippy::too_many_arguments)]
    fn bwd_partials(
        &self,
        batch: &mut Batch,
        plan: &Plan,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        relu_y: Option<&Tensor>,
        dz: Option<&Arc<GpuBuffer>>,
    ) -> Result<Arc<GpuBuffer>> {
        plan.check_reducible()?;
        let [partials] = self.buffers([plan.partials_len()])?;
        let family = plan.pick(Family::BwdPartials, Family::BwdPartialsCols);
        for chunk in plan.chunk_list() {
            let mut params = plan.reduce(&chunk);
            let y = match relu_y {
                Some(y) => {
                    params.flags |= FLAG_RELU;
                    plan.part(buffer(y), &chunk)
                }
                None => (&self.dummy_read).into(),
            };
            let dz = match dz {
                Some(dz) => {
                    params.flags |= FLAG_DZ;
                    plan.part(dz, &chunk)
                }
                None => (&self.dummy_write).into(),
            };
            let binds = vec![
                plan.part(buffer(x), &chunk),
                plan.part(buffer(dy), &chunk),
                data_buffer(saved).into(),
                plan.partials(&partials),
                y,
                dz,
            ];
            self.launch(batch, family, plan.units(), params, binds);
        }
        Ok(partials)
    }

    /// The dx passes with the coefficients in `coef`; dy masked by `relu_y` > 0 where
    /// given, and the masked dy written to `dz` where given.
    #[allow(clippy::too_many_arguments)]
    fn bwd_dx(
        &self,
        batch: &mut Batch,
        plan: &Plan,
        dy: &Tensor,
        x: &Tensor,
        coef: &Arc<GpuBuffer>,
        dx: &Arc<GpuBuffer>,
        training: bool,
        relu_y: Option<&Tensor>,
        dz: Option<&Arc<GpuBuffer>>,
    ) {
        let mut flags = if training { FLAG_TRAINING } else { 0 };
        if relu_y.is_some() {
            flags |= FLAG_RELU;
        }
        if dz.is_some() {
            flags |= FLAG_DZ;
        }
        let family = plan.pick(Family::BwdDx, Family::BwdDxCols);
        for chunk in plan.chunk_list() {
            let binds = vec![
                plan.part(buffer(x), &chunk),
                plan.part(buffer(dy), &chunk),
                coef.into(),
                plan.part(dx, &chunk),
                relu_y.map_or_else(
                    || (&self.dummy_read).into(),
                    |y| plan.part(buffer(y), &chunk),
                ),
                dz.map_or_else(|| (&self.dummy_write).into(), |dz| plan.part(dz, &chunk)),
            ];
            self.launch(
                batch,
                family,
                plan.units(),
                plan.elementwise(&chunk, flags),
                binds,
            );
        }
    }
}

thread_local! {
    /// The caller's encoder while [`GpuContext::record`] runs on this thread, with the
    /// address of the context it records for.
    static RECORDING: std::cell::RefCell<Option<(usize, wgpu::CommandEncoder)>> =
        const { std::cell::RefCell::new(None) };
}

impl GpuContext {
    /// Encodes a batch's steps: copies as copies, each run of launches as one compute pass;
    /// with `timed`, kernel timing covers the last pass (a gather's copies come first). The
    /// caller keeps the steps (and so the buffers they hold) until the work is submitted.
    fn encode_steps(&self, encoder: &mut wgpu::CommandEncoder, steps: &[Step], timed: bool) {
        let mut stamps = if timed {
            self.timer.as_ref().and_then(|t| t.begin(&self.device))
        } else {
            None
        };
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let mut launches = Vec::new();
        let mut steps = steps.iter().peekable();
        while let Some(step) = steps.next() {
            match step {
                Step::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    bytes,
                } => encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *bytes),
                Step::Launch(l) => {
                    launches.push(l);
                    if !matches!(steps.peek(), Some(Step::Launch(_))) {
                        let last = steps.peek().is_none();
                        let ts = stamps.as_ref().filter(|_| last).map(|s| &s.query_set);
                        let dispatched = launches.iter().filter(|l| l.params.groups > 0);
                        self.dispatches
                            .fetch_add(dispatched.count() as u64, Ordering::Relaxed);
                        encode(
                            &self.device,
                            &self.queue,
                            &self.kernels,
                            encoder,
                            max_dim,
                            &launches,
                            ts,
                        );
                        launches.clear();
                    }
                }
            }
        }
        if let (Some(timer), Some(s)) = (&self.timer, stamps.take()) {
            timer.end(encoder, s);
        }
    }

    /// Runs `f` with every operation of this context on this thread encoding into
    /// `encoder` instead of submitting; see [`Context::record`](crate::Context::record).
    pub fn record<T>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let me = self as *const Self as usize;
        let busy = RECORDING.with(|r| r.borrow().is_some());
        if busy {
            return Err(crate::error::Error::InvalidArgument {
                op: "record",
                reason: "a recording is already running on this thread".into(),
            });
        }
        // The caller's encoder moves in for the duration; a placeholder takes its place.
        let placeholder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("placeholder"),
            });
        let theirs = std::mem::replace(encoder, placeholder);
        RECORDING.with(|r| *r.borrow_mut() = Some((me, theirs)));
        // Put it back even if `f` panics.
        struct Restore<'a>(&'a mut wgpu::CommandEncoder);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                if let Some((_, e)) = RECORDING.with(|r| r.borrow_mut().take()) {
                    *self.0 = e;
                }
            }
        }
        let _restore = Restore(encoder);
        f()
    }

    /// Whether this thread is recording for this context (its reads must wait for the
    /// caller's submission, so they are refused).
    pub fn is_recording(&self) -> bool {
        let me = self as *const Self as usize;
        RECORDING.with(|r| matches!(&*r.borrow(), Some((owner, _)) if *owner == me))
    }
}

impl Backend for GpuContext {
    fn begin(&self) -> Result<Batch> {
        self.check_alive()?;
        Ok(Batch {
            scope: Some(Scope::push(&self.device)),
            ..Batch::default()
        })
    }

    fn moments(&self, batch: &mut Batch, x: &Tensor) -> Result<Summaries> {
        let c = x.shape().channels();
        let [out] = self.buffers([4 * c])?;
        match self.stats_partials(batch, x)? {
            None => self.fill_zero(&out, 4 * c),
            Some((plan, partials)) => {
                let params = plan.finalize(true, FLAG_MOMENTS);
                let w = &self.dummy_write;
                let binds = vec![
                    plan.partials(&partials),
                    w.into(),
                    w.into(),
                    w.into(),
                    (&out).into(),
                ];
                self.launch(batch, Family::StatsFinalize, PER_CHANNEL, params, binds);
            }
        }
        Ok(Summaries::Gpu(out))
    }

    fn gather(
        &self,
        batch: &mut Batch,
        parts: &[(&Summaries, u64)],
        channels: usize,
        eps: f32,
        running: Option<Running<'_>>,
    ) -> Result<Data> {
        let total: u64 = parts.iter().map(|p| p.1).sum();
        let c = channels as u32;
        let [saved] = self.buffers([2 * channels])?;
        // The parts side by side, part-major (a single part is bound as it is).
        let merged = if let [(only, _)] = parts {
            summaries(only).clone()
        } else {
            let [scratch] = self.buffers([4 * channels * parts.len()])?;
            let bytes = (16 * channels) as u64;
            for (i, (s, _)) in parts.iter().enumerate() {
                batch.steps.push(Step::Copy {
                    src: summaries(s).clone(),
                    src_offset: 0,
                    dst: scratch.clone(),
                    dst_offset: i as u64 * bytes,
                    bytes,
                });
            }
            scratch
        };
        let mut params = per_channel(c, parts.len() as u32, 1, c, FLAG_SAVED);
        params.eps = eps;
        let [rm, rv] = self.running_binds(batch, running, total, &mut params)?;
        let binds = vec![
            (&merged).into(),
            rm,
            rv,
            (&saved).into(),
            (&self.dummy_write).into(),
        ];
        self.launch(batch, Family::StatsFinalize, PER_CHANNEL, params, binds);
        Ok(gpu(saved))
    }

    fn batch_stats(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        eps: f32,
        running: Option<Running<'_>>,
    ) -> Result<Data> {
        let c = x.shape().channels();
        let [saved] = self.buffers([2 * c])?;
        match self.stats_partials(batch, x)? {
            // Nothing to launch; pooled buffers hold old data, so say zeros.
            None => self.fill_zero(&saved, 2 * c),
            Some((plan, partials)) => {
                let mut params = plan.finalize(true, FLAG_SAVED);
                params.eps = eps;
                let count = x.shape().view().per_channel() as u64;
                let [rm, rv] = self.running_binds(batch, running, count, &mut params)?;
                let binds = vec![
                    plan.partials(&partials),
                    rm,
                    rv,
                    (&saved).into(),
                    (&self.dummy_write).into(),
                ];
                self.launch(batch, Family::StatsFinalize, PER_CHANNEL, params, binds);
            }
        }
        Ok(gpu(saved))
    }

    fn train_forward(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        eps: f32,
        running: Option<Running<'_>>,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        epi: Epilogue<'_>,
    ) -> Result<(Data, Data)> {
        let plan = self.plan(x.shape().view(), x.dtype())?;
        // The one-pass kernel has no epilogue: the fused forward takes the two passes.
        let one = epi
            .is_none()
            .then(|| plan.one_pass(self.one_pass_cap(), 1))
            .flatten();
        let Some(one) = one else {
            return stats_then_elemt(self, batch, x, eps, running, weight, bias, epi);
        };
        let c = x.shape().channels();
        let [saved, y] = self.buffers([2 * c, x.words()])?;
        let mut flags = FLAG_SAVED;
        if weight.is_some() {
            flags |= FLAG_WEIGHT;
        }
        if bias.is_some() {
            flags |= FLAG_BIAS;
        }
        let mut params = one.params(flags);
        params.eps = eps;
        let count = x.shape().view().per_channel() as u64;
        let [rm, rv] = self.running_binds(batch, running, count, &mut params)?;
        let chunk = plan.chunk_list()[0];
        let binds = vec![
            plan.part(buffer(x), &chunk),
            self.or_dummy(weight),
            self.or_dummy(bias),
            rm,
            rv,
            (&saved).into(),
            plan.part(&y, &chunk),
        ];
        self.launch(batch, Family::FwdOnePass, PER_CHANNEL, params, binds);
        Ok((gpu(saved), gpu(y)))
    }

    fn running_stats(
        &self,
        batch: &mut Batch,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Result<Data> {
        let c = mean.numel();
        let [saved] = self.buffers([2 * c])?;
        let params = Params {
            channels: c as u32,
            groups: (c as u32).div_ceil(WORKGROUP_SIZE),
            eps,
            ..Params::default()
        };
        let binds = vec![bind(mean), bind(var), (&saved).into()];
        self.launch(batch, Family::StatsRunning, PER_CHANNEL, params, binds);
        Ok(gpu(saved))
    }

    fn elemt(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        epi: Epilogue<'_>,
    ) -> Result<Data> {
        let plan = self.plan(x.shape().view(), x.dtype())?;
        let [y] = self.buffers([x.words()])?;
        if plan.is_empty() {
            return Ok(gpu(y));
        }
        let mut flags = 0;
        for (on, flag) in [
            (weight.is_some(), FLAG_WEIGHT),
            (bias.is_some(), FLAG_BIAS),
            (epi.residual.is_some(), FLAG_RESIDUAL),
            (epi.relu, FLAG_RELU),
        ] {
            if on {
                flags |= flag;
            }
        }
        let family = plan.pick(Family::Apply, Family::ApplyCols);
        for chunk in plan.chunk_list() {
            let binds = vec![
                plan.part(buffer(x), &chunk),
                data_buffer(saved).into(),
                self.or_dummy(weight),
                self.or_dummy(bias),
                plan.part(&y, &chunk),
                epi.residual.map_or_else(
                    || (&self.dummy_read).into(),
                    |z| plan.part(buffer(z), &chunk),
                ),
            ];
            self.launch(
                batch,
                family,
                plan.units(),
                plan.elementwise(&chunk, flags),
                binds,
            );
        }
        Ok(gpu(y))
    }

    fn backward_reduce(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        dweight: bool,
        dbias: bool,
    ) -> Result<Reduced> {
        let c = x.shape().channels();
        let plan = self.plan(x.shape().view(), x.dtype())?;
        let [sums, dw, db] = self.buffers([4 * c, c, c])?;
        if plan.is_empty() {
            // An empty batch has zero sums and gradients; pooled buffers hold old data.
            self.fill_zero(&sums, 4 * c);
            self.fill_zero(&dw, c);
            self.fill_zero(&db, c);
        } else {
            let partials = self.bwd_partials(batch, &plan, dy, x, saved, None, None)?;
            let mut flags = FLAG_SUMS;
            if dweight {
                flags |= FLAG_DWEIGHT;
            }
            if dbias {
                flags |= FLAG_DBIAS;
            }
            let binds = vec![
                plan.partials(&partials),
                data_buffer(saved).into(),
                (&self.dummy_read).into(),
                (&dw).into(),
                (&db).into(),
                (&sums).into(),
            ];
            self.launch(
                batch,
                Family::BwdFinalize,
                PER_CHANNEL,
                plan.finalize(true, flags),
                binds,
            );
        }
        Ok(Reduced {
            sums: Summaries::Gpu(sums),
            dweight: dweight.then(|| gpu(dw)),
            dbias: dbias.then(|| gpu(db)),
        })
    }

    fn backward_elemt(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        sums: Option<(&Summaries, u64)>,
    ) -> Result<Data> {
        let c = x.shape().channels();
        let plan = self.plan(x.shape().view(), x.dtype())?;
        let [dx, coef] = self.buffers([x.words(), 4 * c])?;
        if plan.is_empty() {
            return Ok(gpu(dx));
        }
        let weight_flag = if weight.is_some() { FLAG_WEIGHT } else { 0 };
        let (mut params, source) = match sums {
            Some((s, n)) => {
                let mut p = per_channel(c as u32, 1, 1, 0, FLAG_TRAINING | weight_flag);
                p.inv_count = (1.0 / n as f64) as f32;
                (p, summaries(s).into())
            }
            None => (
                per_channel(c as u32, 0, 1, 0, weight_flag),
                (&self.dummy_read).into(),
            ),
        };
        params.channels = c as u32;
        let w = &self.dummy_write;
        let binds = vec![
            source,
            data_buffer(saved).into(),
            self.or_dummy(weight),
            w.into(),
            w.into(),
            (&coef).into(),
        ];
        self.launch(batch, Family::BwdFinalize, PER_CHANNEL, params, binds);
        self.bwd_dx(batch, &plan, dy, x, &coef, &dx, sums.is_some(), None, None);
        Ok(gpu(dx))
    }

    fn backward(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        training: bool,
        (want_dx, want_dw, want_db): (bool, bool, bool),
        epi: EpilogueGrad<'_>,
    ) -> Result<Grads> {
        let c = x.shape().channels();
        let plan = self.plan(x.shape().view(), x.dtype())?;
        // dz comes out of the dx pass: with dz, that pass runs (dx is then written too).
        let run_dx = want_dx || epi.dz;
        let [dx, dw, db, coef, dz] = self.buffers([
            if run_dx { x.words() } else { 0 },
            c,
            c,
            4 * c,
            if epi.dz { x.words() } else { 0 },
        ])?;
        let reduce = want_dw || want_db || (run_dx && training);
        // The one-pass kernel has no epilogue: the fused backward takes the two passes.
        let one = (epi.is_none() && (reduce || want_dx))
            .then(|| plan.one_pass(self.one_pass_cap(), 2))
            .flatten();
        if plan.is_empty() {
            // An empty batch has zero gradients; pooled buffers hold old data.
            self.fill_zero(&dw, c);
            self.fill_zero(&db, c);
        } else if let Some(one) = one {
            let mut flags = 0;
            for (on, flag) in [
                (training, FLAG_TRAINING),
                (weight.is_some(), FLAG_WEIGHT),
                (want_dw, FLAG_DWEIGHT),
                (want_db, FLAG_DBIAS),
                (want_dx, FLAG_DX),
            ] {
                if on {
                    flags |= flag;
                }
            }
            let mut params = one.params(flags);
            params.inv_count = (1.0 / x.shape().view().per_channel() as f64) as f32;
            let chunk = plan.chunk_list()[0];
            let binds = vec![
                plan.part(buffer(x), &chunk),
                plan.part(buffer(dy), &chunk),
                data_buffer(saved).into(),
                self.or_dummy(weight),
                (&dw).into(),
                (&db).into(),
                if want_dx {
                    plan.part(&dx, &chunk)
                } else {
                    (&dx).into()
                },
            ];
            self.launch(batch, Family::BwdOnePass, PER_CHANNEL, params, binds);
        } else if reduce || run_dx {
            // With a reduction, dz is written by its first pass (see bwd_partials.wgsl).
            // (dz is the masked dy: the first pass writes it only where it masks.)
            let dz_first = (reduce && epi.dz && epi.relu_y.is_some()).then_some(&dz);
            let partials: Bind = if reduce {
                plan.partials(&self.bwd_partials(batch, &plan, dy, x, saved, epi.relu_y, dz_first)?)
            } else {
                (&self.dummy_read).into()
            };
            let mut flags = 0;
            if training {
                flags |= FLAG_TRAINING;
            }
            if weight.is_some() {
                flags |= FLAG_WEIGHT;
            }
            if want_dw {
                flags |= FLAG_DWEIGHT;
            }
            if want_db {
                flags |= FLAG_DBIAS;
            }
            let mut params = plan.finalize(reduce, flags);
            params.inv_count = (1.0 / x.shape().view().per_channel() as f64) as f32;
            let binds = vec![
                partials,
                data_buffer(saved).into(),
                self.or_dummy(weight),
                (&dw).into(),
                (&db).into(),
                (&coef).into(),
            ];
            self.launch(batch, Family::BwdFinalize, PER_CHANNEL, params, binds);
            if run_dx {
                if dz_first.is_some() {
                    // dx from the masked dy that the first pass wrote: x and dz read, no y.
                    let g =
                        Tensor::typed(x.context(), x.shape().clone(), gpu(dz.clone()), x.dtype());
                    self.bwd_dx(batch, &plan, &g, x, &coef, &dx, training, None, None);
                } else {
                    let dz = epi.dz.then_some(&dz);
                    self.bwd_dx(batch, &plan, dy, x, &coef, &dx, training, epi.relu_y, dz);
                }
            }
        }
        Ok(Grads {
            dx: want_dx.then(|| gpu(dx)),
            dweight: want_dw.then(|| gpu(dw)),
            dbias: want_db.then(|| gpu(db)),
            dz: epi.dz.then(|| gpu(dz)),
        })
    }

    fn submit(&self, batch: Batch) -> Result<()> {
        let Batch { steps, scope } = batch;
        if !steps.is_empty() {
            // Into the caller's encoder while `Context::record` runs on this thread.
            let recorded = RECORDING.with(|r| match &mut *r.borrow_mut() {
                Some((owner, encoder)) if *owner == self as *const Self as usize => {
                    self.encode_steps(encoder, &steps, false);
                    true
                }
                _ => false,
            });
            if recorded {
                // The work runs whenever the caller submits: none of its buffers may be
                // handed to anything else before then, so none goes back to the pool.
                for owner in steps.iter().flat_map(Step::owners) {
                    owner.detach();
                }
            } else {
                let mut encoder =
                    self.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("batchnorm"),
                        });
                self.encode_steps(&mut encoder, &steps, true);
                self.queue.submit(Some(encoder.finish()));
            }
        }
        // The buffers the steps hold go back to the pool only now, after the submission:
        // the queue runs their next owner's work after this.
        drop(steps);
        match scope {
            Some(scope) => scope.pop(),
            None => Ok(()),
        }
    }

    fn download_summaries(
        &self,
        s: &Summaries,
        channels: usize,
        count: u64,
        moments: bool,
    ) -> Result<Vec<[f64; 2]>> {
        let raw = self.read(summaries(s), 0, 4 * channels)?;
        Ok(raw
            .chunks(4)
            .map(|v| {
                if moments {
                    let mean = v[1] as f64 + v[2] as f64;
                    if count == 0 {
                        [0.0, 0.0]
                    } else {
                        [mean, (v[3] as f64).powi(2) * count as f64]
                    }
                } else {
                    [v[0] as f64, v[1] as f64]
                }
            })
            .collect())
    }

    fn upload_summaries(&self, pairs: &[[f64; 2]], count: u64, moments: bool) -> Result<Summaries> {
        let raw: Vec<f32> = pairs
            .iter()
            .flat_map(|&[a, b]| {
                if !moments {
                    [a as f32, b as f32, 0.0, 0.0]
                } else if count == 0 {
                    [0.0; 4]
                } else {
                    // The mean as a shift plus the f32 residual keeps its f64 precision.
                    let k = if (a as f32).is_finite() {
                        a as f32
                    } else {
                        0.0
                    };
                    [
                        count as f32,
                        k,
                        (a - k as f64) as f32,
                        (b / count as f64).sqrt() as f32,
                    ]
                }
            })
            .collect();
        Ok(Summaries::Gpu(Arc::new(self.upload(&raw, "summaries")?)))
    }
}
