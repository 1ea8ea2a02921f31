// Command tlog-reference checks and produces CivicGrid's audit-log formats
// with the Go reference implementations, for the interoperability tests in
// tests/tests/integration/tlog_interop.rs:
//
//   - signed notes (C2SP signed-note, Ed25519 type 0x01): golang.org/x/mod/sumdb/note
//   - cosignatures (C2SP tlog-cosignature, cosignature/v1, type 0x04) and
//     checkpoints (C2SP tlog-checkpoint): github.com/transparency-dev/formats
//   - RFC 6962 / RFC 9162 Merkle proofs: github.com/transparency-dev/merkle
//
// Every subcommand exits 0 and prints a short result on success, and exits 1
// with a message on stderr on failure.
package main

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	flog "github.com/transparency-dev/formats/log"
	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
)

const usage = `usage: tlog-reference COMMAND [flags]

commands:
  verify-checkpoint  -log-key VKEY -note FILE [-origin O] [-witness-key WKEY ...]
  verify-inclusion   -index N -size N -leaf-hash B64 -root B64 -proof B64,B64,...
  verify-consistency -old N -new N -old-root B64 -new-root B64 -proof B64,...
  verify-proofs      (JSON lines on stdin, one "ok" or "fail<TAB>reason" line each on stdout)
  leaf-hash          -data-file FILE
  sign               -name NAME -seed-hex HEX -size N -root B64
  cosign             -name NAME -seed-hex HEX -note FILE -time T
  vkey               -name NAME -seed-hex HEX -type 1|4
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(1)
	}
	commands := map[string]func([]string) error{
		"verify-checkpoint":  verifyCheckpoint,
		"verify-inclusion":   verifyInclusion,
		"verify-consistency": verifyConsistency,
		"verify-proofs":      verifyProofs,
		"leaf-hash":          leafHash,
		"sign":               sign,
		"cosign":             cosign,
		"vkey":               vkey,
	}
	command, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown command %q\n%s", os.Args[1], usage)
		os.Exit(1)
	}
	if err := command(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "tlog-reference %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, " ") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string, required ...string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for _, name := range required {
		if !set[name] {
			return fmt.Errorf("-%s is required", name)
		}
	}
	return nil
}

// verifyCheckpoint opens the note with x/mod's note.Open (through
// formats/log.ParseCheckpoint, which calls it) with the log's Ed25519 key
// and a cosignature/v1 verifier per witness key, requires a verified
// signature by every one of those keys, and prints the checkpoint.
func verifyCheckpoint(args []string) error {
	fs := newFlags("verify-checkpoint")
	logKey := fs.String("log-key", "", "the log's verifier key (type 0x01)")
	notePath := fs.String("note", "", "file holding the signed checkpoint note")
	origin := fs.String("origin", "", "the expected origin (default: the log key's name)")
	var witnessKeys stringList
	fs.Var(&witnessKeys, "witness-key", "a witness's cosignature/v1 verifier key (type 0x04); repeatable, each one must have cosigned")
	if err := parse(fs, args, "log-key", "note"); err != nil {
		return err
	}
	logVerifier, err := note.NewVerifier(*logKey)
	if err != nil {
		return fmt.Errorf("log key: %v", err)
	}
	var witnessVerifiers []note.Verifier
	for _, key := range witnessKeys {
		v, err := witnessVerifier(key)
		if err != nil {
			return fmt.Errorf("witness key %q: %v", key, err)
		}
		witnessVerifiers = append(witnessVerifiers, v)
	}
	msg, err := os.ReadFile(*notePath)
	if err != nil {
		return err
	}
	if *origin == "" {
		*origin = logVerifier.Name()
	}
	checkpoint, _, n, err := flog.ParseCheckpoint(msg, *origin, logVerifier, witnessVerifiers...)
	if err != nil {
		return err
	}
	for _, v := range witnessVerifiers {
		if !signedBy(n, v) {
			return fmt.Errorf("no verified cosignature by witness %s+%08x", v.Name(), v.KeyHash())
		}
	}
	fmt.Printf("%s %d %s\n", checkpoint.Origin, checkpoint.Size, base64.StdEncoding.EncodeToString(checkpoint.Hash))
	return nil
}

// witnessVerifier is formats' cosignature/v1 verifier for an Ed25519
// cosignature key. NewVerifierForCosignatureV1 checks neither that the key
// is of type 0x04 (it also takes 0x01 keys) nor the key hash written in the
// vkey, so both are checked here: a vkey CivicGrid writes must be exact.
func witnessVerifier(vkey string) (note.Verifier, error) {
	v, err := fnote.NewVerifierForCosignatureV1(vkey)
	if err != nil {
		return nil, err
	}
	parts := strings.SplitN(vkey, "+", 3)
	key, err := base64.StdEncoding.DecodeString(parts[2])
	if err != nil || len(key) == 0 || key[0] != 0x04 {
		return nil, errors.New("not an Ed25519 cosignature/v1 key (type 0x04)")
	}
	if want := fmt.Sprintf("%08x", v.KeyHash()); parts[1] != want {
		return nil, fmt.Errorf("key hash %s, but the name and key hash to %s", parts[1], want)
	}
	return v, nil
}

func signedBy(n *note.Note, v note.Verifier) bool {
	for _, s := range n.Sigs {
		if s.Name == v.Name() && s.Hash == v.KeyHash() {
			return true
		}
	}
	return false
}

func decodeHash(what, b64 string) ([]byte, error) {
	h, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", what, err)
	}
	if len(h) != sha256.Size {
		return nil, fmt.Errorf("%s: %d bytes, not %d", what, len(h), sha256.Size)
	}
	return h, nil
}

func decodeProof(hashes []string) ([][]byte, error) {
	out := make([][]byte, 0, len(hashes))
	for i, b64 := range hashes {
		h, err := decodeHash(fmt.Sprintf("proof hash %d", i), b64)
		if err != nil {
			return nil, err
		}
		out = append(out, h)
	}
	return out, nil
}

func splitProof(list string) []string {
	if list == "" {
		return nil
	}
	return strings.Split(list, ",")
}

type inclusion struct {
	Index    uint64   `json:"index"`
	Size     uint64   `json:"size"`
	LeafHash string   `json:"leaf_hash"`
	Root     string   `json:"root"`
	Proof    []string `json:"proof"`
}

func (c *inclusion) verify() error {
	leaf, err := decodeHash("leaf hash", c.LeafHash)
	if err != nil {
		return err
	}
	root, err := decodeHash("root", c.Root)
	if err != nil {
		return err
	}
	path, err := decodeProof(c.Proof)
	if err != nil {
		return err
	}
	return proof.VerifyInclusion(rfc6962.DefaultHasher, c.Index, c.Size, leaf, path, root)
}

type consistency struct {
	Old     uint64   `json:"old"`
	New     uint64   `json:"new"`
	OldRoot string   `json:"old_root"`
	NewRoot string   `json:"new_root"`
	Proof   []string `json:"proof"`
}

func (c *consistency) verify() error {
	oldRoot, err := decodeHash("old root", c.OldRoot)
	if err != nil {
		return err
	}
	newRoot, err := decodeHash("new root", c.NewRoot)
	if err != nil {
		return err
	}
	path, err := decodeProof(c.Proof)
	if err != nil {
		return err
	}
	return proof.VerifyConsistency(rfc6962.DefaultHasher, c.Old, c.New, path, oldRoot, newRoot)
}

func verifyInclusion(args []string) error {
	fs := newFlags("verify-inclusion")
	var c inclusion
	fs.Uint64Var(&c.Index, "index", 0, "leaf index")
	fs.Uint64Var(&c.Size, "size", 0, "tree size")
	fs.StringVar(&c.LeafHash, "leaf-hash", "", "base64 leaf hash")
	fs.StringVar(&c.Root, "root", "", "base64 root hash")
	list := fs.String("proof", "", "comma-separated base64 proof hashes")
	if err := parse(fs, args, "index", "size", "leaf-hash", "root", "proof"); err != nil {
		return err
	}
	c.Proof = splitProof(*list)
	if err := c.verify(); err != nil {
		return err
	}
	fmt.Println("ok")
	return nil
}

func verifyConsistency(args []string) error {
	fs := newFlags("verify-consistency")
	var c consistency
	fs.Uint64Var(&c.Old, "old", 0, "old tree size")
	fs.Uint64Var(&c.New, "new", 0, "new tree size")
	fs.StringVar(&c.OldRoot, "old-root", "", "base64 old root hash")
	fs.StringVar(&c.NewRoot, "new-root", "", "base64 new root hash")
	list := fs.String("proof", "", "comma-separated base64 proof hashes")
	if err := parse(fs, args, "old", "new", "old-root", "new-root", "proof"); err != nil {
		return err
	}
	c.Proof = splitProof(*list)
	if err := c.verify(); err != nil {
		return err
	}
	fmt.Println("ok")
	return nil
}

// verifyProofs reads one JSON object a line from stdin, either
// {"inclusion": {index, size, leaf_hash, root, proof}} or
// {"consistency": {old, new, old_root, new_root, proof}}, and writes one
// line per input: "ok", or "fail", a tab and the reason. A line that is not
// such an object stops it with exit status 1.
func verifyProofs(args []string) error {
	if err := parse(newFlags("verify-proofs"), args); err != nil {
		return err
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 0, 1<<16), 1<<24)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for line := 1; in.Scan(); line++ {
		var req struct {
			Inclusion   *inclusion   `json:"inclusion"`
			Consistency *consistency `json:"consistency"`
		}
		dec := json.NewDecoder(bytes.NewReader(in.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return fmt.Errorf("line %d: %v", line, err)
		}
		var err error
		switch {
		case req.Inclusion != nil && req.Consistency == nil:
			err = req.Inclusion.verify()
		case req.Consistency != nil && req.Inclusion == nil:
			err = req.Consistency.verify()
		default:
			return fmt.Errorf("line %d: exactly one of \"inclusion\" and \"consistency\" is needed", line)
		}
		if err != nil {
			fmt.Fprintf(out, "fail\t%s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Fprintln(out, "ok")
		}
	}
	return in.Err()
}

func leafHash(args []string) error {
	fs := newFlags("leaf-hash")
	path := fs.String("data-file", "", "file holding the leaf's data")
	if err := parse(fs, args, "data-file"); err != nil {
		return err
	}
	data, err := os.ReadFile(*path)
	if err != nil {
		return err
	}
	fmt.Println(base64.StdEncoding.EncodeToString(rfc6962.DefaultHasher.HashLeaf(data)))
	return nil
}

func seedFlag(fs *flag.FlagSet) *string {
	return fs.String("seed-hex", "", "the 32-byte Ed25519 seed in hex")
}

func decodeSeed(seedHex string) ([]byte, error) {
	seed, err := hex.DecodeString(seedHex)
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("-seed-hex must be %d bytes in hex", ed25519.SeedSize)
	}
	return seed, nil
}

// skey is the signed-note private key `PRIVATE+KEY+name+hash+base64(0x01 ||
// seed)`; x/mod's note.NewSigner checks the hash against the key it derives.
func skey(name string, seed []byte) string {
	pub := ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
	h := sha256.New()
	h.Write([]byte(name + "\n"))
	h.Write([]byte{0x01})
	h.Write(pub)
	hash := binary.BigEndian.Uint32(h.Sum(nil))
	return fmt.Sprintf("PRIVATE+KEY+%s+%08x+%s", name, hash,
		base64.StdEncoding.EncodeToString(append([]byte{0x01}, seed...)))
}

func sign(args []string) error {
	fs := newFlags("sign")
	name := fs.String("name", "", "the key name and the checkpoint's origin")
	seedHex := seedFlag(fs)
	size := fs.Uint64("size", 0, "tree size")
	rootB64 := fs.String("root", "", "base64 root hash")
	if err := parse(fs, args, "name", "seed-hex", "size", "root"); err != nil {
		return err
	}
	seed, err := decodeSeed(*seedHex)
	if err != nil {
		return err
	}
	root, err := decodeHash("root", *rootB64)
	if err != nil {
		return err
	}
	signer, err := note.NewSigner(skey(*name, seed))
	if err != nil {
		return err
	}
	body := flog.Checkpoint{Origin: *name, Size: *size, Hash: root}.Marshal()
	signed, err := note.Sign(&note.Note{Text: string(body)}, signer)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(signed)
	return err
}

// fixedTimeCosigner is a note.Signer producing Ed25519 cosignature/v1
// signatures at a given time.
//
// formats' NewSignerForCosignatureV1 always signs at time.Now() and cannot be
// given a time, so the signature is computed here by hand following C2SP
// tlog-cosignature with crypto/ed25519: the signed message is
// "cosignature/v1\ntime <T>\n" followed by the note text, and the signature
// is the 8-byte big-endian T followed by the Ed25519 signature. The key hash
// is the library signer's, x/mod's note.Sign writes the signature line, and
// `cosign` checks the result with the library's cosignature/v1 verifier
// (which is also what verifies in verify-checkpoint).
type fixedTimeCosigner struct {
	name string
	hash uint32
	key  ed25519.PrivateKey
	time uint64
}

func (s *fixedTimeCosigner) Name() string    { return s.name }
func (s *fixedTimeCosigner) KeyHash() uint32 { return s.hash }
func (s *fixedTimeCosigner) Sign(msg []byte) ([]byte, error) {
	m := fmt.Appendf(nil, "cosignature/v1\ntime %d\n%s", s.time, msg)
	sig := binary.BigEndian.AppendUint64(nil, s.time)
	return append(sig, ed25519.Sign(s.key, m)...), nil
}

func cosign(args []string) error {
	fs := newFlags("cosign")
	name := fs.String("name", "", "the witness's key name")
	seedHex := seedFlag(fs)
	notePath := fs.String("note", "", "file holding the signed note to cosign")
	t := fs.Uint64("time", 0, "the cosignature's time, POSIX seconds")
	if err := parse(fs, args, "name", "seed-hex", "note", "time"); err != nil {
		return err
	}
	seed, err := decodeSeed(*seedHex)
	if err != nil {
		return err
	}
	msg, err := os.ReadFile(*notePath)
	if err != nil {
		return err
	}
	// With no known verifiers, note.Open parses the note and returns it
	// inside an UnverifiedNoteError.
	var unverified *note.UnverifiedNoteError
	if _, err := note.Open(msg, note.VerifierList()); !errors.As(err, &unverified) {
		return fmt.Errorf("not a signed note: %v", err)
	}
	text := unverified.Note.Text
	library, err := fnote.NewSignerForCosignatureV1(skey(*name, seed))
	if err != nil {
		return err
	}
	signer := &fixedTimeCosigner{name: library.Name(), hash: library.KeyHash(), key: ed25519.NewKeyFromSeed(seed), time: *t}
	signed, err := note.Sign(&note.Note{Text: text}, signer)
	if err != nil {
		return err
	}
	// Check the hand-made cosignature with the library's verifier.
	if n, err := note.Open(signed, note.VerifierList(library.Verifier())); err != nil || len(n.Sigs) != 1 {
		return fmt.Errorf("the cosignature does not verify with formats' verifier: %v", err)
	}
	line := signed[len(text)+1:]
	_, err = os.Stdout.Write(line)
	return err
}

func vkey(args []string) error {
	fs := newFlags("vkey")
	name := fs.String("name", "", "the key name")
	seedHex := seedFlag(fs)
	keyType := fs.Int("type", 1, "1: Ed25519 signed-note key; 4: Ed25519 cosignature/v1 key")
	if err := parse(fs, args, "name", "seed-hex", "type"); err != nil {
		return err
	}
	seed, err := decodeSeed(*seedHex)
	if err != nil {
		return err
	}
	pub := ed25519.NewKeyFromSeed(seed).Public().(ed25519.PublicKey)
	key, err := note.NewEd25519VerifierKey(*name, pub)
	if err != nil {
		return err
	}
	switch *keyType {
	case 1:
	case 4:
		if key, err = fnote.VKeyToCosignatureV1(key); err != nil {
			return err
		}
	default:
		return fmt.Errorf("-type is 1 or 4, not %d", *keyType)
	}
	fmt.Println(key)
	return nil
}
