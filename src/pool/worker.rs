//! The worker side: the loop of a worker process, `critical` and
//! `ordered` sections, and posting results.

use super::*;

// ---------------------------------------------------------------------------
// The worker side.
// ---------------------------------------------------------------------------

/// The context of a work function, in a worker process: the item's index,
/// and the pool's [`critical`](Worker::critical) and
/// [`ordered`](Worker::ordered) sections.
pub struct Worker<'a> {
    pub(super) dict: &'a ShmDict,
    pub(super) id: usize,
    pub(super) n: u64,
    pub(super) index: Cell<u64>,
    pub(super) chunk_start: Cell<u64>,
    pub(super) ordered_done: Cell<bool>,
}

impl fmt::Debug for Worker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("index", &self.index())
            .finish()
    }
}

impl Worker<'_> {
    /// The index of the item being worked on (in `init`: `usize::MAX`).
    pub fn index(&self) -> usize {
        let i = self.index.get();
        if i < self.n {
            i as usize
        } else {
            usize::MAX
        }
    }

    /// This worker's number, `0..pool.workers()`.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Runs `f` while no other worker of this map runs a `critical` section:
    /// a robust cross-process mutex (OpenMP `critical`, sharedmem's
    /// `with pool.critical`).
    ///
    /// If a worker is killed inside its section, the kernel releases the
    /// mutex: the next worker to enter gets it (it does not wait for the
    /// dead one), and the map ends with [`PoolError::Killed`] naming the dead
    /// worker's item. Data that section was changing may be half updated:
    /// after such an error, treat what the sections protect as suspect.
    ///
    /// Must not be nested (a second `critical` inside `f` fails the item).
    pub fn critical<T>(&self, f: impl FnOnce() -> T) -> T {
        let guard = match self.dict.lock() {
            Ok(g) => g,
            Err(e) => abort(Abort::Failed(format!("critical section: {e}"))),
        };
        let out = f();
        drop(guard);
        out
    }

    /// Runs `f` after the `ordered` sections of all earlier items, and
    /// before those of later items (OpenMP `ordered`): sections run one at a
    /// time in item order, while the rest of each work function runs in
    /// parallel. Items that do not call `ordered` are skipped over once they
    /// finish. At most one `ordered` section per item (a second call fails
    /// the item).
    ///
    /// Waits asleep. If the map fails meanwhile (another item panicked or
    /// its worker died), `ordered` does not run `f`: the item is abandoned
    /// (the work function unwinds, dropping its values) and the map returns
    /// that failure.
    ///
    /// With guided scheduling a worker runs a chunk of consecutive items, so
    /// a later chunk's sections wait for the whole earlier chunk; use
    /// [`Pool::chunk_size`]`(1)` when the work around the sections is long.
    pub fn ordered<T>(&self, f: impl FnOnce() -> T) -> T {
        let k = self.index.get();
        if k >= self.n {
            abort(Abort::Failed("ordered outside a work item".into()));
        }
        if self.ordered_done.replace(true) {
            abort(Abort::Failed(format!("ordered called twice for item {k}")));
        }
        loop {
            let (v, seen) = self
                .dict
                .get_versioned(TURN)
                .unwrap_or_else(|e| fail_ordered(e));
            let t = le(v.as_deref());
            if t == k {
                break;
            }
            if t == ABORTED {
                abort(Abort::Stopped);
            }
            if t > k {
                abort(Abort::Failed(format!(
                    "ordered: the turn ({t}) passed item {k} before its section ran"
                )));
            }
            if t >= self.chunk_start.get() {
                // Items t..k are ours and done: pass over them.
                pass_turn(self.dict, t, k).unwrap_or_else(|e| fail_ordered(e));
                continue;
            }
            let _ = self
                .dict
                .wait_change(TURN, seen, Duration::from_secs(1))
                .unwrap_or_else(|e| fail_ordered(e));
        }
        let out = f();
        pass_turn(self.dict, k, k + 1).unwrap_or_else(|e| fail_ordered(e));
        out
    }
}

/// A worker process's life: open the coordination segment, `init`, then
/// claim chunks and run items until none are left or the map stops.
/// Returns the exit code.
pub(super) fn worker_main<I, S, R>(
    plan: &Plan<'_>,
    w: usize,
    items: &mut [Option<I>],
    init: &impl Fn(&Worker<'_>) -> S,
    work: &impl Fn(&mut S, &Worker<'_>, I) -> R,
) -> i32
where
    R: Serialize,
{
    // Attach only: if the name is gone, creating a new empty segment under
    // it would leak it and coordinate with nobody.
    let d = match ShmDict::options().create(false).open(plan.name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("shmdict pool worker {w}: cannot open the coordination segment: {e}");
            return EXIT_NO_SEGMENT;
        }
    };
    // Tell the parent we are attached: once all are, it drops the name.
    if set_u64(&d, &cur_key(w), IDLE)
        .and_then(|_| d.update(PING, |v| Some((le(v) + 1).to_le_bytes().to_vec())))
        .is_err()
    {
        eprintln!("shmdict pool worker {w}: cannot report to the coordination segment");
        return EXIT_POST_FAILED;
    }
    install_panic_hook();
    let worker = Worker {
        dict: &d,
        id: w,
        n: plan.n,
        index: Cell::new(NO_ITEM),
        chunk_start: Cell::new(0),
        ordered_done: Cell::new(false),
    };
    let mut poster = Poster {
        dict: &d,
        w,
        posted: 0,
    };
    let code = match panic::catch_unwind(AssertUnwindSafe(|| init(&worker))) {
        Ok(mut state) => {
            let code = run_items(plan, &worker, &mut poster, items, &mut state, work);
            drop(state);
            code
        }
        Err(p) => {
            let entry = outcome_of_unwind(NO_ITEM, p);
            match entry {
                Some(e) => poster.post(&[e]).map_or(EXIT_POST_FAILED, |_| 0),
                None => 0,
            }
        }
    };
    if code == 0 {
        // Wake the parent, which then waits for our exit.
        let _ = set_u64(&d, &cur_key(w), EXITING);
        let _ = d.update(PING, |v| Some((le(v) + 1).to_le_bytes().to_vec()));
    }
    drop(d);
    code
}

/// The result entry for an item whose work function unwound (`None`: the
/// map was stopped, nothing to report).
pub(super) fn outcome_of_unwind(i: u64, p: Box<dyn std::any::Any + Send>) -> Option<Entry> {
    match p.downcast::<Abort>() {
        Ok(a) => match *a {
            Abort::Stopped => None,
            Abort::Failed(m) => Some((i, TAG_FAILED, m.into_bytes())),
        },
        Err(p) => Some((i, TAG_PANIC, panic_message(&*p).into_bytes())),
    }
}

pub(super) struct Poster<'a> {
    pub(super) dict: &'a ShmDict,
    pub(super) w: usize,
    pub(super) posted: u64,
}

impl Poster<'_> {
    /// Posts one batch and wakes the parent.
    pub(super) fn post(&mut self, batch: &[Entry]) -> crate::Result<()> {
        let bytes = postcard::to_allocvec(batch).map_err(|source| Error::Codec {
            segment: self.dict.name().to_owned(),
            source,
        })?;
        self.dict.insert(result_key(self.w, self.posted), bytes)?;
        self.posted += 1;
        self.dict
            .update(PING, |v| Some((le(v) + 1).to_le_bytes().to_vec()))?;
        Ok(())
    }
}

pub(super) fn run_items<I, S, R: Serialize>(
    plan: &Plan<'_>,
    worker: &Worker<'_>,
    poster: &mut Poster<'_>,
    items: &mut [Option<I>],
    state: &mut S,
    work: &impl Fn(&mut S, &Worker<'_>, I) -> R,
) -> i32 {
    let d = worker.dict;
    let cur = cur_key(worker.id);
    let report = |e: Error| {
        eprintln!("shmdict pool worker {}: {e}", worker.id);
        EXIT_POST_FAILED
    };
    loop {
        if get_u64(d, STOP).ok().flatten() != Some(0) {
            return 0;
        }
        // Claim a chunk [start, end), recorded as "claiming" meanwhile.
        if let Err(e) = set_u64(d, &cur, CLAIMING) {
            return report(e);
        }
        let claimed = Cell::new((0u64, 0u64));
        let r = d.update(NEXT, |v| {
            let start = le(v).min(plan.n);
            let left = plan.n - start;
            let size = plan
                .chunk
                .unwrap_or_else(|| (left / (4 * plan.workers)).clamp(1, MAX_CHUNK));
            let end = start + size.min(left);
            claimed.set((start, end));
            Some(end.to_le_bytes().to_vec())
        });
        if let Err(e) = r {
            return report(e);
        }
        let (start, end) = claimed.get();
        if start == end {
            return set_u64(d, &cur, IDLE).map_or_else(report, |_| 0);
        }
        worker.chunk_start.set(start);
        let mut batch: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut failed = false;
        for i in start..end {
            if i > start && get_u64(d, STOP).ok().flatten() != Some(0) {
                break;
            }
            if let Err(e) = set_u64(d, &cur, i) {
                return report(e);
            }
            worker.index.set(i);
            worker.ordered_done.set(false);
            let Some(item) = items.get_mut(i as usize).and_then(Option::take) else {
                batch.push((i, TAG_FAILED, b"item index out of range".to_vec()));
                failed = true;
                break;
            };
            let entry = match panic::catch_unwind(AssertUnwindSafe(|| work(state, worker, item))) {
                Ok(r) => match postcard::to_allocvec(&r) {
                    Ok(v) => (i, TAG_OK, v),
                    Err(e) => (
                        i,
                        TAG_FAILED,
                        format!("cannot encode the result: {e}").into_bytes(),
                    ),
                },
                Err(p) => match outcome_of_unwind(i, p) {
                    Some(e) => e,
                    None => {
                        // Stopped: the map has failed; report nothing more.
                        return set_u64(d, &cur, IDLE).map_or_else(report, |_| 0);
                    }
                },
            };
            failed = entry.1 != TAG_OK;
            bytes += entry.2.len() + 16;
            batch.push(entry);
            if failed {
                break;
            }
            if bytes >= BATCH_BYTES && i + 1 < end {
                if let Err(e) = poster.post(&batch) {
                    return report(e);
                }
                batch.clear();
                bytes = 0;
            }
        }
        worker.index.set(NO_ITEM);
        // Pass `turn` over this chunk's items, all done, before the parent
        // learns of them (see the module docs).
        if !failed {
            if let Err(e) = pass_turn(d, start, end) {
                return report(e);
            }
        }
        if !batch.is_empty() {
            if let Err(e) = poster.post(&batch) {
                return report(e);
            }
        }
        if let Err(e) = set_u64(d, &cur, IDLE) {
            return report(e);
        }
        if failed {
            return 0;
        }
    }
}

// ---------------------------------------------------------------------------
// spawn
// ---------------------------------------------------------------------------
