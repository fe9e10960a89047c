"""Triton advantage normalisation for arbitrary integer group ids, in one launch.

Groups are found with an open-addressing hash table (Fibonacci hashing of the id, linear
probing, compare-and-swap inserts) held in a workspace. A persistent grid of at most one program
per SM sweeps the batch in six phases, separated by grid-wide barriers:

    0  clear the table's keys
    1  insert every row's id, remember its slot; whoever claims a slot initialises its fields
    2  per group: count of valid rewards, min, max, first row           (atomics)
    3  per group: sum of (r - min) / (max - min)                        (int64 fixed point)
    4  per group: sum of squared deviations from the mean, / (max-min)^2 (int64 fixed point)
    5  advantages, and optionally each row's group statistics

The two sums are integers: each term is rounded to a multiple of 2^-(62 - ceil(log2 n)) (n the
group's count, so the sum stays below 2^62), about 2^-38 of the group's range at n = 2^24 and
finer for smaller groups. Integer addition is associative, so the result does not depend on the
order in which programs add: it is deterministic, and shuffling the batch shuffles the
advantages bit for bit. Group j's statistics go to its rows; ``is_first`` marks each group's
first row, so callers list groups in order of first appearance (as verl's dict of uids does).

Contiguous groups too long for the tile kernel of triton_groups.py run here as well (IDS_FROM_ROWS):
a row's slot is row // group_size, phase 0 initialises every group and phase 1 only stashes the
combined rewards, so even a single group of B rows is spread over every SM.

The barrier needs every program resident at once: the grid is at most one program per SM, it is
launched cooperatively (a grid that cannot be co-resident, because NCCL kernels, an in-process
vLLM or MPS hold SMs, fails to launch instead of spinning forever), and the barrier word is left
at zero by every launch. The Triton interpreter runs programs one after another, so there the grid
is one program; ``_launch(split_phases=True)`` runs each phase as its own launch instead (launch
boundaries act as barriers), which lets the tests cover many programs on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1kernels import backends
from r1kernels.constants import SCALE_CODES
from r1kernels._tensors import accumulation_dtype
from r1kernels.advantages.triton_group_stats import INF, combined_rewards, finish_group, wide_dtype

EMPTY = tl.constexpr(-(2 ** 63))                # an empty slot; the id -2^63 gets the reserved slot
GOLDEN = tl.constexpr(-7046029254386353131)     # 2^64 / golden ratio, as a signed int64
SUM_BITS = tl.constexpr(62)
INT32_MAX = tl.constexpr(2 ** 31 - 1)
PHASES = 6
BLOCK = 1024


@triton.jit
def _grid_barrier(state_ptr, num_programs):
    """Sense-reversing barrier: state[0] counts arrivals, state[1] is the generation. The last
    program to arrive resets the count and bumps the generation, which releases the others.

    These are the only ordered atomics of the kernel (every other one only accumulates, and is
    read after a barrier): the arrival releases this program's writes and, for the last program,
    acquires everyone's; the bump releases them all again; the spin acquires them. The generation
    read before the arrival needs no order of its own (the arrival's release keeps it first)."""
    tl.debug_barrier()                                   # every thread's writes precede the arrival
    generation = tl.atomic_add(state_ptr + 1, 0, sem="relaxed")
    if tl.atomic_add(state_ptr, 1, sem="acq_rel") == num_programs - 1:
        tl.atomic_xchg(state_ptr, 0, sem="relaxed")      # nobody reads the count before the bump
        tl.atomic_add(state_ptr + 1, 1, sem="release")
    else:
        while tl.atomic_add(state_ptr + 1, 0, sem="acquire") == generation:
            pass
    tl.debug_barrier()


@triton.jit
def _find_slots(keys_ptr, ids, active, capacity, hash_shift):
    """Slot of each id (claiming an empty one if the id is new) and whether this lane claimed it."""
    reserved = ids == EMPTY
    hashed = (ids * GOLDEN).to(tl.uint64, bitcast=True) >> hash_shift.to(tl.uint64)
    slot = tl.where(reserved, capacity, hashed.to(tl.int64))
    searching = active & ~reserved
    claimed = searching & False
    empty = tl.full(ids.shape, EMPTY, tl.int64)
    while tl.max(searching.to(tl.int32), axis=0) > 0:
        # lanes that are done compare-and-swap their own key (or the reserved slot's EMPTY): no-ops
        # relaxed: a key is its own payload, and the slot's fields are read only after a barrier
        old = tl.atomic_cas(keys_ptr + slot, empty, ids, sem="relaxed")
        claimed = claimed | (searching & (old == EMPTY))
        searching = searching & (old != EMPTY) & (old != ids)
        slot = tl.where(searching, (slot + 1) & (capacity - 1), slot)
    return slot, claimed


@triton.jit
def _fixed_point_unit(count):
    """2^(62 - ceil(log2 n)): n terms of at most one unit sum to at most 2^62 < 2^63."""
    bits = tl.math.ceil(tl.math.log2(tl.maximum(count, 1).to(tl.float64)))
    return tl.math.exp2(-(bits - SUM_BITS))       # (constexpr - tensor stays a constexpr in the interpreter)


@triton.jit
def _to_fixed_point(fraction, unit):
    return tl.math.floor(fraction * unit + 0.5).to(tl.int64)


@triton.jit
def _init_slots(count_ptr, first_ptr, lo_ptr, hi_ptr, sum_ptr, m2_ptr, slots, mask):
    """Empty groups: no rewards, first row 'none yet', min +inf, max -inf, zero sums."""
    tl.store(count_ptr + slots, 0, mask=mask)
    tl.store(first_ptr + slots, INT32_MAX, mask=mask)
    tl.store(lo_ptr + slots, INF, mask=mask)
    tl.store(hi_ptr + slots, -INF, mask=mask)
    tl.store(sum_ptr + slots, 0, mask=mask)
    tl.store(m2_ptr + slots, 0, mask=mask)


@triton.jit
def _r1k_advantages_by_id(
        rewards_ptr, row_stride, weights_ptr, ids_ptr, group_size, batch_denominator_ptr, batch, eps,
        keys_ptr, slot_of_row_ptr, count_ptr, first_ptr, lo_ptr, hi_ptr, sum_ptr, m2_ptr, capacity, hash_shift,
        barrier_ptr, stash_ptr, adv_ptr, mean_ptr, std_ptr, constant_ptr, is_first_ptr,
        NUM_REWARDS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, IDS_FROM_ROWS: tl.constexpr,
        LEAVE_ONE_OUT: tl.constexpr, SCALE: tl.constexpr, WRITE_STATS: tl.constexpr, FIRST_PHASE: tl.constexpr,
        LAST_PHASE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr):
    """IDS_FROM_ROWS: contiguous groups of group_size rows, whose slot is row // group_size (no
    hashing; ``capacity`` is the number of groups) and whose statistics go to [G] outputs. Phase 1
    stashes each row's combined reward (WIDE) in ``stash``: ``adv`` itself when WIDE is ACC."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    for phase in tl.static_range(FIRST_PHASE, LAST_PHASE + 1):
        if phase > FIRST_PHASE:
            _grid_barrier(barrier_ptr, programs)
        if phase == 0:
            if IDS_FROM_ROWS:                            # initialise every group
                for start in range(pid * BLOCK, capacity, programs * BLOCK):
                    _init_slots(count_ptr, first_ptr, lo_ptr, hi_ptr, sum_ptr, m2_ptr, start + lanes,
                                start + lanes < capacity)
            else:                                        # clear the keys (slot `capacity` is reserved)
                for start in range(pid * BLOCK, capacity + 1, programs * BLOCK):
                    tl.store(keys_ptr + start + lanes, EMPTY, mask=start + lanes <= capacity)
                _init_slots(count_ptr, first_ptr, lo_ptr, hi_ptr, sum_ptr, m2_ptr, capacity, pid == 0)
        else:
            for start in range(pid * BLOCK, batch, programs * BLOCK):
                rows = start + lanes
                in_batch = rows < batch
                if phase == 1:                           # insert ids; stash combined rewards
                    if not IDS_FROM_ROWS:
                        ids = tl.load(ids_ptr + rows, mask=in_batch, other=EMPTY).to(tl.int64)
                        slot, claimed = _find_slots(keys_ptr, ids, in_batch, capacity, hash_shift)
                        tl.store(slot_of_row_ptr + rows, slot.to(tl.int32), mask=in_batch)
                        _init_slots(count_ptr, first_ptr, lo_ptr, hi_ptr, sum_ptr, m2_ptr, slot, claimed)
                    x = combined_rewards(rewards_ptr, rows.to(tl.int64), in_batch, row_stride, weights_ptr,
                                         NUM_REWARDS, HAS_WEIGHTS, ACC, WIDE)
                    tl.store(stash_ptr + rows, x, mask=in_batch)
                else:
                    if IDS_FROM_ROWS:
                        slot = tl.where(in_batch, rows // group_size, 0)
                    else:
                        slot = tl.load(slot_of_row_ptr + rows, mask=in_batch, other=0)
                    x = tl.load(stash_ptr + rows, mask=in_batch, other=float("nan"))
                    valid = in_batch & (x == x)
                    if phase == 2:                       # count, min, max, first row
                        # accumulating atomics are relaxed: the grid barrier orders them before any read
                        tl.atomic_add(count_ptr + slot, 1, mask=valid, sem="relaxed")
                        tl.atomic_min(lo_ptr + slot, x, mask=valid, sem="relaxed")
                        tl.atomic_max(hi_ptr + slot, x, mask=valid, sem="relaxed")
                        tl.atomic_min(first_ptr + slot, rows, mask=in_batch, sem="relaxed")
                    else:
                        # other programs' atomics wrote these: volatile loads skip the L1 cache
                        count = tl.load(count_ptr + slot, mask=in_batch, other=0, volatile=True)
                        lo = tl.load(lo_ptr + slot, mask=in_batch, other=0.0, volatile=True).to(tl.float64)
                        hi = tl.load(hi_ptr + slot, mask=in_batch, other=0.0, volatile=True).to(tl.float64)
                        spread = tl.where(count > 0, hi - lo, 0.0)       # an empty group has lo = inf
                        used = valid & (spread > 0)
                        fraction = tl.where(used, (x.to(tl.float64) - lo) / tl.where(used, spread, 1.0), 0.0)
                        unit = _fixed_point_unit(count)
                        if phase == 3:                   # sum of (r - min) / range
                            tl.atomic_add(sum_ptr + slot, _to_fixed_point(fraction, unit), mask=valid,
                                          sem="relaxed")
                        else:
                            sum_units = tl.load(sum_ptr + slot, mask=in_batch, other=0, volatile=True)
                            mean_fraction = sum_units.to(tl.float64) / unit / tl.maximum(count, 1)
                            deviation = fraction - mean_fraction
                            if phase == 4:               # sum of squared deviations / range^2
                                tl.atomic_add(m2_ptr + slot, _to_fixed_point(deviation * deviation, unit),
                                              mask=valid, sem="relaxed")
                            else:                        # phase 5: advantages
                                m2_units = tl.load(m2_ptr + slot, mask=in_batch, other=0, volatile=True)
                                m2 = m2_units.to(tl.float64) / unit * spread * spread
                                # float64 squares of fp32 rewards' spreads cannot overflow: the unit is 1
                                mean, std, constant, factor = finish_group(
                                    count, lo, hi, tl.full(lo.shape, 1.0, tl.float64), mean_fraction * spread, m2,
                                    eps, batch_denominator_ptr, LEAVE_ONE_OUT, SCALE)
                                adv = tl.where(valid & ~constant, deviation * spread * factor, 0.0)
                                tl.store(adv_ptr + rows, adv.to(ACC), mask=in_batch)
                                if WRITE_STATS:
                                    if IDS_FROM_ROWS:            # one row per group writes its [G] stats
                                        where = slot
                                        writes = in_batch & (rows % group_size == 0)
                                    else:                        # every row writes its group's stats
                                        where = rows
                                        writes = in_batch
                                        first = tl.load(first_ptr + slot, mask=in_batch, other=-1, volatile=True)
                                        tl.store(is_first_ptr + rows, rows == first, mask=in_batch)
                                    tl.store(mean_ptr + where, mean.to(ACC), mask=writes)
                                    tl.store(std_ptr + where, std.to(ACC), mask=writes)
                                    tl.store(constant_ptr + where, constant, mask=writes)


_barrier_words: dict = {}


def _barrier_word(device: torch.device) -> torch.Tensor:
    """A zeroed [arrivals, generation] pair per device and stream; each launch leaves it at zero
    arrivals, so it is allocated (and zeroed) once."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _barrier_words:
        _barrier_words[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _barrier_words[key]


def group_normalize_by_id(rewards, weights, group_ids, *, leave_one_out, scale, eps, batch_denominator, with_stats,
                          group_size=0):
    """See ``torch_groups.group_normalize_by_id`` for the contract. With
    ``group_size`` instead of ids (``group_ids`` None): contiguous groups, statistics [G] and
    ``is_first`` empty."""
    return _launch(rewards, weights, group_ids, leave_one_out=leave_one_out, scale=scale, eps=eps,
                   batch_denominator=batch_denominator, with_stats=with_stats, group_size=group_size)


def launch_options(programs: int, split_phases: bool) -> dict:
    """A single launch of several programs is cooperative: its grid barrier needs them co-resident."""
    return dict(num_warps=4, **({"launch_cooperative_grid": True} if programs > 1 and not split_phases else {}))


def _launch(rewards, weights, group_ids, *, leave_one_out, scale, eps, batch_denominator, with_stats, group_size=0,
            programs=None, split_phases=False):
    """group_normalize_by_id with the tests' knobs: ``programs`` (the grid) and ``split_phases``."""
    batch, num_rewards = rewards.shape
    if batch >= 2 ** 31:
        raise ValueError(f"group_ids: at most 2^31 - 1 rows, got {batch}")
    device = rewards.device
    acc = accumulation_dtype(rewards.dtype)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    wide = wide_dtype(acc_tl, num_rewards, weights is not None)
    wide_torch = torch.float64 if wide == tl.float64 else acc
    ids_from_rows = group_size > 0
    if ids_from_rows:
        capacity = batch // group_size                    # one slot per group, no hashing
        slot_count, stats_size = capacity, capacity if with_stats else 0
    else:
        capacity = triton.next_power_of_2(2 * batch)      # load factor at most 1/2
        slot_count, stats_size = capacity + 1, batch if with_stats else 0   # + the id -2^63's slot
    keys = torch.empty(0 if ids_from_rows else slot_count, dtype=torch.int64, device=device)
    slot_of_row = torch.empty(0 if ids_from_rows else batch, dtype=torch.int32, device=device)
    counts, firsts = (torch.empty(slot_count, dtype=torch.int32, device=device) for _ in range(2))
    lows, highs = (torch.empty(slot_count, dtype=wide_torch, device=device) for _ in range(2))
    sums, squares = (torch.empty(slot_count, dtype=torch.int64, device=device) for _ in range(2))
    adv = torch.empty(batch, dtype=acc, device=device)
    stash = adv if wide_torch == acc else torch.empty(batch, dtype=wide_torch, device=device)
    mean, std = (torch.empty(stats_size, dtype=acc, device=device) for _ in range(2))
    constant = torch.empty(stats_size, dtype=torch.bool, device=device)
    is_first = torch.empty(0 if ids_from_rows else stats_size, dtype=torch.bool, device=device)
    if programs is None:
        # The interpreter runs programs one after another: a second program would wait forever at
        # the first barrier, so there the grid is one program (on GPU tensors too).
        resident = (torch.cuda.get_device_properties(device).multi_processor_count
                    if device.type == "cuda" and not backends.triton_interpreting() else 1)
        programs = max(1, min(resident, triton.cdiv(batch, BLOCK)))
    launches = [(p, p) for p in range(PHASES)] if split_phases else [(0, PHASES - 1)]
    for first_phase, last_phase in launches:
        _r1k_advantages_by_id[(programs,)](
            rewards, rewards.stride(0), weights if weights is not None else adv,
            adv if ids_from_rows else group_ids, max(group_size, 1),
            batch_denominator if batch_denominator is not None else adv, batch, eps,
            keys, slot_of_row, counts, firsts, lows, highs, sums, squares, capacity,
            64 - (capacity.bit_length() - 1), _barrier_word(device), stash, adv, mean, std, constant, is_first,
            NUM_REWARDS=num_rewards, HAS_WEIGHTS=weights is not None, IDS_FROM_ROWS=ids_from_rows,
            LEAVE_ONE_OUT=leave_one_out, SCALE=SCALE_CODES[scale], WRITE_STATS=with_stats, FIRST_PHASE=first_phase,
            LAST_PHASE=last_phase, BLOCK=BLOCK, ACC=acc_tl, WIDE=wide,
            **launch_options(programs, split_phases))
    return adv, mean, std, constant, is_first
