package main

import (
	"net"
)

// getReputation is the seed program's stand-in for a reputation lookup:
// loopback addresses score 0.75, everything else 0.
func getReputation(ip net.IP) (float64, error) {
	if ip.IsLoopback() {
		return 0.75, nil
	}
	return 0, nil
}
