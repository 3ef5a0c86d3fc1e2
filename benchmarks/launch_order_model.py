"""What starting the sequential state kernels' programs longest sequence first can gain, by a
scheduling model (no GPU): programs start in index order on `slots` SMs, each takes time
proportional to its chain length, and a launch lasts until its last program ends. MoM's
packed segments: per batch row four memories sharing top-2 of the tokens (a random split) and
the shared memory's segment of all of them, memory-major as the layer packs them
(megatron_mom/layer/packing.py: segment (m, row) at m * rows + row, the shared memory last)
or row-major as tune_launch.py makes them; 64-token chunks, H = 4.

    python benchmarks/launch_order_model.py

Prints, per shape and launch, the makespan over the ideal max(work / slots, longest chain)
in index order and longest first (mean over random segment splits).
"""
import heapq
import random


def makespan(chains, slots: int) -> float:
    ends = [0.0] * slots
    last = 0.0
    for length in chains:
        start = heapq.heappop(ends)
        last = max(last, start + length)
        heapq.heappush(ends, start + length)
    return last


def segments(rows: int, seq: int, rng: random.Random, memory_major: bool):
    per_row = []
    for _ in range(rows):
        share = [rng.random() + 0.5 for _ in range(4)]
        mem = [int(s / sum(share) * 2 * seq) for s in share]
        mem[-1] = 2 * seq - sum(mem[:-1])
        per_row.append(mem + [seq])
    if memory_major:
        return [row[m] for m in range(5) for row in per_row]
    return [n for row in per_row for n in row]


def main(trials: int = 20, heads: int = 4, chunk: int = 64):
    rng = random.Random(0)
    # (launch, V blocks, programs an SM runs at once): the K = 256 entries of TUNED_LAUNCH
    launches = [("state_fwd BV32", 8, 1), ("state_bwd BV16", 16, 2)]
    print("| segments | rows x tokens | launch | index order / ideal | longest first / ideal |")
    print("|---|---|---|---|---|")
    for (rows, seq), major in [(shape, major) for major in (True, False)
                               for shape in ((4, 4096), (1, 16384), (8, 2048))]:
        sums = {name: [0.0, 0.0] for name, _, _ in launches}
        for _ in range(trials):
            chunks = [-(-n // chunk) for n in segments(rows, seq, rng, major)]
            for name, vblocks, per_sm in launches:
                # grid (V block, head, sequence): the V block varies fastest
                chains = [c for c in chunks for _ in range(heads * vblocks)]
                slots = 132 * per_sm
                ideal = max(sum(chains) / slots, max(chains))
                sums[name][0] += makespan(chains, slots) / ideal / trials
                sums[name][1] += makespan(sorted(chains, reverse=True), slots) / ideal / trials
        for name, (given, longest) in sums.items():
            order = "memory-major (layer)" if major else "row-major (tune_launch)"
            print(f"| {order} | {rows} x {seq} | {name} | {given:.3f} | {longest:.3f} |")


if __name__ == "__main__":
    main()
