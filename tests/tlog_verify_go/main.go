// Command tlog_verify_go checks a C2SP tlog-tiles log with golang.org/x/mod/sumdb/tlog and
// sumdb/note, the Go checksum database's tiles code that tlog-tiles grew out of (Debian
// package golang-golang-x-mod-dev). None of forge's code is involved; this file only maps
// x/mod's tile paths (tile/8/L/N, tile/8/data/N) to tlog-tiles' (tile/L/N, tile/entries/N)
// and splits entry bundles. Every hash, tile check and proof is x/mod's.
//
//	tlog_verify_go LOCATION LOG_VKEY [OLD_CHECKPOINT_FILE...]
//
// LOCATION is a URL or a folder. Prints one JSON line; exit 0 when every check passed, 1
// when one failed.
package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const height = 8

type source struct{ base string }

func (s source) get(path string) ([]byte, error) {
	if !strings.HasPrefix(s.base, "http://") && !strings.HasPrefix(s.base, "https://") {
		return os.ReadFile(filepath.Join(s.base, filepath.FromSlash(path)))
	}
	resp, err := http.Get(strings.TrimRight(s.base, "/") + "/" + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET %s: HTTP %d", path, resp.StatusCode)
	}
	return io.ReadAll(resp.Body)
}

// c2sp maps an x/mod tile path (tile/8/L/N[.p/W]) to its tlog-tiles path (tile/L/N[.p/W]).
func c2sp(t tlog.Tile) string {
	return "tile/" + strings.TrimPrefix(t.Path(), fmt.Sprintf("tile/%d/", height))
}

// tiles is an x/mod TileReader over a tlog-tiles log; x/mod checks every tile it returns.
type tiles struct{ src source }

func (r tiles) Height() int { return height }

func (r tiles) ReadTiles(ts []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(ts))
	for i, t := range ts {
		data, err := r.src.get(c2sp(t))
		if err != nil {
			return nil, err
		}
		out[i] = data
	}
	return out, nil
}

func (r tiles) SaveTiles([]tlog.Tile, [][]byte) {}

func openCheckpoint(text []byte, verifier note.Verifier) (string, tlog.Tree, error) {
	n, err := note.Open(text, note.VerifierList(verifier))
	if err != nil {
		return "", tlog.Tree{}, fmt.Errorf("checkpoint signature: %w", err)
	}
	lines := strings.SplitN(n.Text, "\n", 4)
	if len(lines) < 4 {
		return "", tlog.Tree{}, errors.New("checkpoint has fewer than three lines")
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return "", tlog.Tree{}, err
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != tlog.HashSize {
		return "", tlog.Tree{}, errors.New("checkpoint root is not a base64 SHA-256 hash")
	}
	var hash tlog.Hash
	copy(hash[:], root)
	return lines[0], tlog.Tree{N: size, Hash: hash}, nil
}

func check(location, vkey string, olds []string) (map[string]any, error) {
	src := source{location}
	verifier, err := note.NewVerifier(vkey)
	if err != nil {
		return nil, err
	}
	text, err := src.get("checkpoint")
	if err != nil {
		return nil, err
	}
	origin, tree, err := openCheckpoint(text, verifier)
	if err != nil {
		return nil, err
	}
	reader := tlog.TileHashReader(tree, tiles{src})
	root, err := tlog.TreeHash(tree.N, reader)
	if err != nil {
		return nil, fmt.Errorf("tree hash from the tiles: %w", err)
	}
	if root != tree.Hash {
		return nil, errors.New("tiles do not hash to the signed root")
	}
	// Entry bundles: each entry's RFC 6962 record hash is its leaf in the verified tiles.
	for start := int64(0); start < tree.N; start += 1 << height {
		width := tree.N - start
		if width > 1<<height {
			width = 1 << height
		}
		tile := tlog.Tile{H: height, L: 0, N: start >> height, W: int(width)}
		bundle, err := src.get("tile/entries/" + strings.TrimPrefix(tile.Path(), "tile/8/0/"))
		if err != nil {
			return nil, err
		}
		indexes := make([]int64, width)
		for i := range indexes {
			indexes[i] = tlog.StoredHashIndex(0, start+int64(i))
		}
		leaves, err := reader.ReadHashes(indexes)
		if err != nil {
			return nil, err
		}
		for i := int64(0); i < width; i++ {
			if len(bundle) < 2 {
				return nil, fmt.Errorf("entry bundle %d ends before entry %d", tile.N, start+i)
			}
			size := int(bundle[0])<<8 | int(bundle[1])
			if len(bundle) < 2+size {
				return nil, fmt.Errorf("entry bundle %d is truncated at entry %d", tile.N, start+i)
			}
			if tlog.RecordHash(bundle[2:2+size]) != leaves[i] {
				return nil, fmt.Errorf("entry %d does not hash to its leaf", start+i)
			}
			bundle = bundle[2+size:]
		}
		if len(bundle) != 0 {
			return nil, fmt.Errorf("entry bundle %d has %d bytes past its entries", tile.N, len(bundle))
		}
	}
	probes := []int64{}
	for _, i := range []int64{0, 255, 256, 511, tree.N - 1} {
		if i >= 0 && i < tree.N && (len(probes) == 0 || probes[len(probes)-1] < i) {
			probes = append(probes, i)
		}
	}
	for _, i := range probes {
		leaf, err := reader.ReadHashes([]int64{tlog.StoredHashIndex(0, i)})
		if err != nil {
			return nil, err
		}
		proof, err := tlog.ProveRecord(tree.N, i, reader)
		if err != nil {
			return nil, err
		}
		if err := tlog.CheckRecord(proof, tree.N, tree.Hash, i, leaf[0]); err != nil {
			return nil, fmt.Errorf("inclusion of %d: %w", i, err)
		}
	}
	oldSizes := []int64{}
	for _, file := range olds {
		text, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		_, old, err := openCheckpoint(text, verifier)
		if err != nil {
			return nil, err
		}
		// The old size's own partial tiles, checked against its signed root by x/mod.
		pastRoot, err := tlog.TreeHash(old.N, tlog.TileHashReader(old, tiles{src}))
		if err != nil || pastRoot != old.Hash {
			return nil, fmt.Errorf("tiles of size %d do not hash to that checkpoint: %v", old.N, err)
		}
		proof, err := tlog.ProveTree(tree.N, old.N, reader)
		if err != nil {
			return nil, err
		}
		if err := tlog.CheckTree(proof, tree.N, tree.Hash, old.N, old.Hash); err != nil {
			return nil, fmt.Errorf("consistency from %d: %w", old.N, err)
		}
		oldSizes = append(oldSizes, old.N)
	}
	return map[string]any{"ok": true, "verifier": "golang.org/x/mod/sumdb/tlog", "origin": origin,
		"size": tree.N, "entries_checked": tree.N, "inclusion_proofs": probes,
		"old_sizes_consistent": oldSizes}, nil
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: tlog_verify_go LOCATION LOG_VKEY [OLD_CHECKPOINT_FILE...]")
		os.Exit(2)
	}
	result, err := check(os.Args[1], os.Args[2], os.Args[3:])
	if err != nil {
		result = map[string]any{"ok": false, "error": err.Error()}
	}
	line, _ := json.Marshal(result)
	fmt.Println(string(line))
	if err != nil {
		os.Exit(1)
	}
}
