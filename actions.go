package spoe

import (
	"math"
	"net"
	"net/netip"
	"strconv"
	"unsafe"

	"github.com/pkg/errors"
)

// VarScope is the scope of a variable HAProxy sets from an action. The full
// name of a variable is <scope>.<var-prefix>.<name>, the prefix being the
// spoe-agent's "option var-prefix" (by default the agent's name).
type VarScope uint8

// The five variable scopes.
const (
	VarScopeProcess     VarScope = 0 // proc.<prefix>.<name>: set only if HAProxy knows the variable (register-var-names)
	VarScopeSession     VarScope = 1 // sess.<prefix>.<name>: the client connection
	VarScopeTransaction VarScope = 2 // txn.<prefix>.<name>: the HTTP transaction
	VarScopeRequest     VarScope = 3 // req.<prefix>.<name>: the request channel
	VarScopeResponse    VarScope = 4 // res.<prefix>.<name>: the response channel
)

var scopeNames = [...]string{"proc", "sess", "txn", "req", "res"}

// String returns the scope as HAProxy writes it in variable names ("txn").
func (s VarScope) String() string {
	if int(s) < len(scopeNames) {
		return scopeNames[s]
	}
	return "scope(" + strconv.Itoa(int(s)) + ")"
}

// Errors of actions. A refused action is left out of the ACK, logged and
// counted; the rest of the ACK still goes, with the error variable set
// (Agent.ErrorVar).
var (
	// ErrVarName: HAProxy would silently drop the variable: a name must be
	// made of [A-Za-z0-9_.] and <scope>.<prefix>.<name> must fit 63 bytes.
	ErrVarName = errors.New("spoe: invalid variable name")
	// ErrVarScope: the scope is not one of the five VarScope constants.
	ErrVarScope = errors.New("spoe: invalid variable scope")
	// ErrVarValue: the value has no SPOP encoding (a Go type SPOP cannot
	// carry, a uint64 above math.MaxInt64, a NaN, an invalid address).
	ErrVarValue = errors.New("spoe: value cannot be sent")
	// ErrACKTooBig: the action would make the ACK longer than the
	// max-frame-size negotiated with HAProxy.
	ErrACKTooBig = errors.New("spoe: actions exceed max-frame-size")
)

// maxVarNameLen is the longest full variable name HAProxy keeps.
const maxVarNameLen = 63

// Action codes of an ACK's LIST-OF-ACTIONS.
const (
	// actionNoop is what the agent sends for "no actions": an ACK with an
	// empty payload is never handed to the SPOE applet by HAProxy 3.1.0
	// (mux_spop.c, spop_conn_handle_ack jumps past it, so the event waits
	// for "timeout processing"), while every version stops quietly at an
	// action type it does not know (flt_spoe.c, spoe_process_actions), and
	// HAProxy 3.2+ itself turns an empty ACK into this one byte
	// (SPOP_ACT_T_NOOP).
	actionNoop     = 0
	actionSetVar   = 1
	actionUnsetVar = 2
)

// An Action is one action of an ACK: ActionSetVar or ActionUnsetVar.
type Action interface {
	writeTo(w *ActionWriter) error
}

// ActionSetVar sets a variable in HAProxy. Value may be:
//
//   - nil: the variable is unset (HAProxy treats a NULL value so);
//   - bool, string, []byte (sent as BINARY), net.IP, netip.Addr;
//   - any Go integer type: int32 as INT32, uint8/uint16/uint32 as UINT32,
//     other signed types as INT64, uint and uint64 as UINT64 if at most
//     math.MaxInt64 (HAProxy reads larger ones as negative, so they are
//     refused); HAProxy stores them all as a signed 64-bit integer;
//   - float32, float64: SPOP has no float, so they travel as a STRING in
//     decimal notation without exponent ("0.75", "-12", "100000"), which
//     HAProxy's int converter reads as the integer part; NaN and infinities
//     are refused;
//   - Value, a typed value as received (to echo an argument back).
type ActionSetVar struct {
	Name  string
	Scope VarScope
	Value interface{}
}

func (a ActionSetVar) writeTo(w *ActionWriter) error { return w.SetVar(a.Scope, a.Name, a.Value) }

// ActionUnsetVar unsets a variable in HAProxy.
type ActionUnsetVar struct {
	Name  string
	Scope VarScope
}

func (a ActionUnsetVar) writeTo(w *ActionWriter) error { return w.UnsetVar(a.Scope, a.Name) }

// ActionWriter appends actions straight into the ACK frame of one NOTIFY.
// It is valid only while the handler that received it runs; builds with the
// race detector turn any later call of its methods into a panic.
//
// Every method checks the variable name, the scope and the value, and that
// the ACK still fits the negotiated max-frame-size (less the room kept for
// the error variable). A refused action is not written; its error is
// returned and also logged and counted by the agent, which sets the error
// variable (Agent.ErrorVar) in the ACK, so that no variable is lost
// silently. (On a connection the agent pipelines with HAProxy 3.1+, an ACK
// that could stall HAProxy is replaced as a whole when it is written: see
// ackWindow.)
type ActionWriter struct {
	buf       []byte // output; the ACK frame starts at start
	start     int
	actions   int // where the ACK's actions start in buf
	limit     int // largest len(buf) allowed
	prefixLen int // length of HAProxy's var-prefix, for name checks
	err       error
	refused   int
	sealed    bool

	// Variable names checkVarName accepted, kept across ACKs: a handler
	// sets the same few names again and again, usually string constants,
	// found here by their address.
	ok     [4]checkedName
	okNext int // the next of ok to replace
}

// checkedName is a variable name accepted for a scope and var-prefix.
type checkedName struct {
	name   string
	scope  VarScope
	prefix int
}

// reset prepares w to build the ACK of (streamID, frameID) at the end of
// buf. maxFrameSize is the negotiated one.
func (w *ActionWriter) reset(buf []byte, streamID, frameID uint64, maxFrameSize, prefixLen int) {
	w.buf, w.start = appendFrameHeader(buf, frameAck, flagFin, streamID, frameID)
	w.actions = len(w.buf)
	// HAProxy 3.5 stalls on an agent frame of exactly max-frame-size bytes:
	// keep ours one byte shorter.
	w.limit = w.start + lengthSize + maxFrameSize - 1
	w.prefixLen = prefixLen
	w.err, w.refused, w.sealed = nil, 0, false
}

// finish completes the ACK and returns the output buffer.
func (w *ActionWriter) finish() []byte {
	if len(w.buf) == w.actions {
		w.buf = append(w.buf, actionNoop) // no actions: see actionNoop
	}
	finishFrame(w.buf, w.start)
	return w.buf
}

// discardActions drops every action written so far, keeping the header.
func (w *ActionWriter) discardActions() { w.buf = w.buf[:w.actions] }

// Err returns the first error met by the writer's methods, or nil.
func (w *ActionWriter) Err() error { w.check(); return w.err }

// check panics when w is used after its handler returned (race builds).
func (w *ActionWriter) check() {
	if w.sealed {
		panic("spoe: ActionWriter used after its handler returned")
	}
}

// SetVar appends a set-var action with any value ActionSetVar accepts.
func (w *ActionWriter) SetVar(scope VarScope, name string, value interface{}) error {
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	if w.buf, err = appendAnyValue(w.buf, value); err != nil {
		w.buf = w.buf[:mark]
		return w.refuse(errors.Wrapf(err, "%s.%s", scope, name))
	}
	return w.end(mark, scope, name)
}

// SetInt appends a set-var action with an INT64 value.
func (w *ActionWriter) SetInt(scope VarScope, name string, value int64) error {
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedInt(w.buf, TypeInt64, uint64(value))
	return w.end(mark, scope, name)
}

// SetUint appends a set-var action with a UINT64 value. HAProxy stores
// variables as signed 64-bit integers, so values above math.MaxInt64 are
// refused with ErrVarValue.
func (w *ActionWriter) SetUint(scope VarScope, name string, value uint64) error {
	w.check()
	if value > math.MaxInt64 {
		return w.refuse(errors.Wrapf(ErrVarValue, "%s.%s: %d above math.MaxInt64", scope, name, value))
	}
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedInt(w.buf, TypeUint64, value)
	return w.end(mark, scope, name)
}

// SetBool appends a set-var action with a BOOL value.
func (w *ActionWriter) SetBool(scope VarScope, name string, value bool) error {
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedBool(w.buf, value)
	return w.end(mark, scope, name)
}

// SetString appends a set-var action with a STRING value.
func (w *ActionWriter) SetString(scope VarScope, name, value string) error {
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedBytes(w.buf, TypeString, value)
	return w.end(mark, scope, name)
}

// SetStringBytes appends a set-var action with a STRING value given as
// bytes, which are copied: an argument's bytes can be echoed without
// building a Go string.
func (w *ActionWriter) SetStringBytes(scope VarScope, name string, value []byte) error {
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedBytes(w.buf, TypeString, value)
	return w.end(mark, scope, name)
}

// SetBinary appends a set-var action with a BINARY value (copied).
func (w *ActionWriter) SetBinary(scope VarScope, name string, value []byte) error {
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedBytes(w.buf, TypeBinary, value)
	return w.end(mark, scope, name)
}

// SetAddr appends a set-var action with an IPV4 value for an IPv4 address
// and an IPV6 value for any other (IPv4-mapped IPv6 addresses stay IPv6).
// The zone, if any, is dropped. An invalid address is refused.
func (w *ActionWriter) SetAddr(scope VarScope, name string, value netip.Addr) error {
	w.check()
	if !value.IsValid() {
		return w.refuse(errors.Wrapf(ErrVarValue, "%s.%s: invalid netip.Addr", scope, name))
	}
	mark, err := w.begin(actionSetVar, scope, name)
	if err != nil {
		return err
	}
	w.buf = appendTypedAddr(w.buf, value)
	return w.end(mark, scope, name)
}

// UnsetVar appends an unset-var action.
func (w *ActionWriter) UnsetVar(scope VarScope, name string) error {
	mark, err := w.begin(actionUnsetVar, scope, name)
	if err != nil {
		return err
	}
	return w.end(mark, scope, name)
}

// begin checks the scope and name and appends the action's head: type,
// NB-ARGS, scope and name. It returns where the action starts.
func (w *ActionWriter) begin(action byte, scope VarScope, name string) (int, error) {
	w.check()
	if int(scope) >= len(scopeNames) {
		return 0, w.refuse(errors.Wrapf(ErrVarScope, "%d for %q", scope, name))
	}
	if !w.checked(scope, name) {
		if err := checkVarName(scope, name, w.prefixLen); err != nil {
			return 0, w.refuse(err)
		}
		w.ok[w.okNext] = checkedName{name, scope, w.prefixLen}
		w.okNext = (w.okNext + 1) % len(w.ok)
	}
	mark := len(w.buf)
	nbArgs := byte(3)
	if action == actionUnsetVar {
		nbArgs = 2
	}
	w.buf = append(w.buf, action, nbArgs, byte(scope))
	w.buf = appendName(w.buf, name)
	return mark, nil
}

// end checks that the ACK still fits; if not, the action is taken back.
func (w *ActionWriter) end(mark int, scope VarScope, name string) error {
	if len(w.buf) > w.limit {
		w.buf = w.buf[:mark]
		return w.refuse(errors.Wrapf(ErrACKTooBig, "%s.%s", scope, name))
	}
	return nil
}

func (w *ActionWriter) refuse(err error) error {
	if w.err == nil {
		w.err = err
	}
	w.refused++
	return err
}

// checkVarName reports an error for a name HAProxy would silently drop:
// empty, with a character outside [A-Za-z0-9_.], or too long for
// <scope>.<prefix>.<name> to fit 63 bytes. prefixLen is the length of the
// var-prefix; 0 means unknown, checked as the shortest possible (1).
// checked reports whether name in scope was accepted before: the same
// string (same bytes at the same address; Go strings do not change).
func (w *ActionWriter) checked(scope VarScope, name string) bool {
	p := unsafe.StringData(name)
	for i := range w.ok {
		c := &w.ok[i]
		if p == unsafe.StringData(c.name) && len(name) == len(c.name) {
			return scope == c.scope && w.prefixLen == c.prefix && name != ""
		}
	}
	return false
}

func checkVarName(scope VarScope, name string, prefixLen int) error {
	if name == "" {
		return errors.Wrap(ErrVarName, "empty name")
	}
	for i := 0; i < len(name); i++ {
		if !varNameChar(name[i]) {
			return errors.Wrapf(ErrVarName, "%q: character %q outside [A-Za-z0-9_.]", name, name[i])
		}
	}
	if prefixLen < 1 {
		prefixLen = 1
	}
	if full := len(scopeNames[scope]) + 1 + prefixLen + 1 + len(name); full > maxVarNameLen {
		return errors.Wrapf(ErrVarName, "%q: %s.<prefix>.%s is %d bytes, HAProxy keeps at most %d",
			name, scope, name, full, maxVarNameLen)
	}
	return nil
}

func varNameChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.'
}

// appendAnyValue appends the typed encoding of a Go value, following the
// rules documented on ActionSetVar.
func appendAnyValue(b []byte, value interface{}) ([]byte, error) {
	switch v := value.(type) {
	case nil:
		return append(b, byte(TypeNull)), nil
	case bool:
		return appendTypedBool(b, v), nil
	case string:
		return appendTypedBytes(b, TypeString, v), nil
	case []byte:
		return appendTypedBytes(b, TypeBinary, v), nil
	case int:
		return appendTypedInt(b, TypeInt64, uint64(v)), nil
	case int8:
		return appendTypedInt(b, TypeInt64, uint64(v)), nil
	case int16:
		return appendTypedInt(b, TypeInt64, uint64(v)), nil
	case int32:
		return appendTypedInt(b, TypeInt32, uint64(v)), nil
	case int64:
		return appendTypedInt(b, TypeInt64, uint64(v)), nil
	case uint8:
		return appendTypedInt(b, TypeUint32, uint64(v)), nil
	case uint16:
		return appendTypedInt(b, TypeUint32, uint64(v)), nil
	case uint32:
		return appendTypedInt(b, TypeUint32, uint64(v)), nil
	case uint:
		return appendUint64(b, uint64(v))
	case uint64:
		return appendUint64(b, v)
	case float64:
		return appendFloat(b, v, 64)
	case float32:
		return appendFloat(b, float64(v), 32)
	case net.IP:
		if ip4 := v.To4(); ip4 != nil {
			return append(append(b, byte(TypeIPv4)), ip4...), nil
		}
		if len(v) == net.IPv6len {
			return append(append(b, byte(TypeIPv6)), v...), nil
		}
		return b, errors.Wrapf(ErrVarValue, "net.IP of %d bytes", len(v))
	case netip.Addr:
		if !v.IsValid() {
			return b, errors.Wrap(ErrVarValue, "invalid netip.Addr")
		}
		return appendTypedAddr(b, v), nil
	case Value:
		if int(v.typ) >= len(typeNames) {
			return b, errors.Wrap(ErrVarValue, "reserved type")
		}
		return appendValue(b, v), nil
	}
	return b, errors.Wrapf(ErrVarValue, "unsupported type %T", value)
}

func appendUint64(b []byte, v uint64) ([]byte, error) {
	if v > math.MaxInt64 {
		return b, errors.Wrapf(ErrVarValue, "%d above math.MaxInt64", v)
	}
	return appendTypedInt(b, TypeUint64, v), nil
}

// appendFloat appends a float as a STRING in decimal notation, with the
// fewest digits that read back to the same float of that size.
func appendFloat(b []byte, f float64, bits int) ([]byte, error) {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return b, errors.Wrapf(ErrVarValue, "float %v", f)
	}
	var tmp [32]byte
	s := strconv.AppendFloat(tmp[:0], f, 'f', -1, bits)
	return appendTypedBytes(b, TypeString, s), nil
}
