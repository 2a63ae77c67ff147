package spoe

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// maxSourceLines is the length a source file of the package may reach
// (tests aside), so that each stays one concern a reader can hold.
const maxSourceLines = 500

// TestSourceFilesShort guards the length of the package's source files.
func TestSourceFilesShort(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		if n := bytes.Count(b, []byte("\n")); n > maxSourceLines {
			t.Errorf("%s has %d lines, more than %d: split it by concern", name, n, maxSourceLines)
		}
	}
	if checked < 20 {
		t.Fatalf("only %d source files found: not run in the package's directory?", checked)
	}
}
