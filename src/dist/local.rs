//! [`LocalComm`]: an in-process group. Ranks are threads; a collective is a rendezvous on
//! one mutex and condition variable, and the last rank to arrive computes the result once
//! for everybody.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Communicator;
use crate::error::{Error, Result};

/// How long a rank of a [`LocalComm::group`] waits for the others in one collective before
/// it gives up and breaks the group.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllGather,
    AllReduceSum,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllGather => "all_gather",
            Op::AllReduceSum => "all_reduce_sum",
        }
    }
}

struct State {
    /// The sequence number of the collective being filled.
    generation: u64,
    /// This collective's contributions, by rank.
    slots: Vec<Option<(Op, Vec<f64>)>>,
    arrived: usize,
    /// The last completed collective and its result, kept until every rank has read it
    /// (the next one cannot complete before that: it needs every rank).
    done: Option<(u64, Arc<Result<Vec<f64>>>)>,
    /// Why the group is unusable, once it is.
    broken: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    /// The state, whether or not a thread panicked while holding the lock (nothing here
    /// panics with the lock held, and the state is consistent between statements anyway).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank of an in-process group: [`LocalComm::group`] makes the group's communicators,
/// one per rank; move each to its rank's thread (`Send` and `Sync`). Each collective is
/// computed once, by the last rank to arrive, and every rank gets the same values.
///
/// No rank waits forever. A rank that leaves the group — its thread panics (its
/// communicator is dropped while unwinding), or it drops its communicator — breaks the
/// group, and so does a rank that waits longer than the group's timeout for the others:
/// every rank waiting then, and every later collective on any rank, returns
/// [`Error::Communication`] naming the cause. A collective that completed before the break
/// still returns its result to the ranks that had not yet picked it up.
///
/// Ranks that call different collectives, or pass slices of different lengths, all get an
/// [`Error::Communication`] for that call; the group stays usable.
///
/// Not compiled on wasm32, which has no threads to put the ranks on (nor
/// `std::time::Instant` for the timeout).
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalComm(rank {} of {})", self.rank, self.shared.world)
    }
}

impl LocalComm {
    /// The communicators of a new group of `world` ranks (index = rank), with the
    /// [`DEFAULT_TIMEOUT`].
    pub fn group(world: usize) -> Result<Vec<LocalComm>> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// [`group`](Self::group) with the time a rank waits for the others in one collective
    /// before it breaks the group (every rank then gets [`Error::Communication`]).
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Result<Vec<LocalComm>> {
        if world == 0 {
            return Err(Error::InvalidArgument {
                op: "LocalComm::group",
                reason: "a group needs at least one rank".into(),
            });
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                slots: vec![None; world],
                arrived: 0,
                done: None,
                broken: None,
            }),
            wake: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Whether the group has been broken (a rank left, or a collective timed out), and why.
    pub fn broken(&self) -> Option<String> {
        self.shared.lock().broken.clone()
    }

    fn collective(&self, op: Op, send: &[f64]) -> Result<Vec<f64>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if let Some(why) = &st.broken {
            return Err(Error::Communication(format!(
                "rank {}: {} on a broken group: {why}",
                self.rank,
                op.name()
            )));
        }
        let generation = st.generation;
        if st.slots[self.rank].is_some() {
            // Two threads share this rank's communicator and are both in a collective.
            return Err(Error::Communication(format!(
                "rank {} entered {} while already in collective #{generation}",
                self.rank,
                op.name()
            )));
        }
        st.slots[self.rank] = Some((op, send.to_vec()));
        st.arrived += 1;
        if st.arrived == shared.world {
            let result = Arc::new(combine(&st.slots, generation));
            st.slots.iter_mut().for_each(|s| *s = None);
            st.arrived = 0;
            st.generation += 1;
            st.done = Some((generation, result.clone()));
            shared.wake.notify_all();
            return (*result).clone();
        }
        let deadline = Instant::now() + shared.timeout;
        loop {
            if let Some((g, result)) = &st.done {
                if *g == generation {
                    return (**result).clone();
                }
            }
            if let Some(why) = &st.broken {
                return Err(Error::Communication(format!(
                    "rank {}: {} (collective #{generation}) did not complete: {why}",
                    self.rank,
                    op.name()
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..shared.world)
                    .filter(|&r| st.slots[r].is_none())
                    .collect();
                let why = format!(
                    "rank {} waited {:?} in {} (collective #{generation}) for ranks {missing:?}",
                    self.rank,
                    shared.timeout,
                    op.name()
                );
                st.broken = Some(why.clone());
                shared.wake.notify_all();
                return Err(Error::Communication(why));
            }
            st = shared
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The result of a full collective: the same `Ok` for every rank, or the same error when
/// the ranks' calls do not match.
fn combine(slots: &[Option<(Op, Vec<f64>)>], generation: u64) -> Result<Vec<f64>> {
    let parts: Vec<&(Op, Vec<f64>)> = slots
        .iter()
        .map(|s| s.as_ref().expect("every rank arrived"))
        .collect();
    let (op0, len0) = (parts[0].0, parts[0].1.len());
    for (rank, (op, v)) in parts.iter().enumerate() {
        if *op != op0 || v.len() != len0 {
            return Err(Error::Communication(format!(
                "mismatched collective #{generation}: rank 0 called {} with {len0} values, \
                 rank {rank} called {} with {}",
                op0.name(),
                op.name(),
                v.len()
            )));
        }
    }
    Ok(match op0 {
        Op::AllGather => parts.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
        Op::AllReduceSum => {
            let mut sum = parts[0].1.clone();
            for (_, v) in &parts[1..] {
                sum.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            sum
        }
    })
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        self.collective(Op::AllGather, send)
    }

    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        self.collective(Op::AllReduceSum, send)
    }
}

impl Drop for LocalComm {
    /// Leaving the group breaks it: no later collective can complete without this rank.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.broken.is_none() {
            st.broken = Some(if std::thread::panicking() {
                format!("rank {} panicked", self.rank)
            } else {
                format!("rank {} left the group", self.rank)
            });
        }
        self.shared.wake.notify_all();
    }
}
