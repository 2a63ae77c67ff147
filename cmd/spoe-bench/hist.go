package main

import (
	"math/bits"
	"time"
)

// histogram counts durations in nanoseconds in log-linear buckets: exact
// below 128 ns, then 64 buckets per power of two, so that a percentile read
// from it is within 1.6% of the true value. It needs no allocation per
// sample.
type histogram struct {
	counts [58*64 + 128]uint64
	n      uint64
	max    uint64
}

func bucketOf(v uint64) int {
	if v < 128 {
		return int(v)
	}
	shift := bits.Len64(v) - 7
	return shift*64 + int(v>>uint(shift))
}

// lowerBound is the smallest value of bucket i.
func lowerBound(i int) uint64 {
	if i < 128 {
		return uint64(i)
	}
	shift := i/64 - 1
	return uint64(i-shift*64) << uint(shift)
}

func (h *histogram) add(d time.Duration) {
	v := uint64(0)
	if d > 0 {
		v = uint64(d)
	}
	h.counts[bucketOf(v)]++
	h.n++
	if v > h.max {
		h.max = v
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	if o.max > h.max {
		h.max = o.max
	}
}

// percentile returns the lower bound of the bucket holding the q-th
// quantile (0 < q <= 1), or 0 for an empty histogram.
func (h *histogram) percentile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen >= rank {
			return time.Duration(lowerBound(i))
		}
	}
	return time.Duration(h.max)
}
