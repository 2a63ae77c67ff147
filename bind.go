package spoe

// Binding a message's arguments into a struct. This is its own file:
// reflection over the caller's types is a concern of its own, apart from
// decoding frames (notify.go) and from the engine, and nothing else in the
// package depends on it.

import (
	"encoding"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"sync"
)

// ArgError is the error Bind returns when an argument is missing, NULL
// where a value is required, or of a type its field cannot hold.
type ArgError struct {
	Message string // the message's name
	Arg     string // the argument's name, as in spoe.conf's "args" line
	Field   string // the struct field's name
	Reason  string // what is wrong: "missing", "NULL", "is string, want int64"...
}

func (e *ArgError) Error() string {
	return fmt.Sprintf("spoe: message %q, argument %q (field %s): %s", e.Message, e.Arg, e.Field, e.Reason)
}

// Bind stores the message's arguments in the fields of the struct v points
// to, by the names in their `spoe` tags:
//
//	var args struct {
//		IP     netip.Addr `spoe:"ip"`
//		Path   string     `spoe:"path"`
//		Length int64      `spoe:"clen,optional"`
//		Agent  *string    `spoe:"ua"`
//	}
//	if err := msg.Bind(&args); err != nil { ... }
//
// A field may be a string or a []byte (from STRING or BINARY), a net.IP or
// netip.Addr (IPV4, IPV6), a bool (BOOL), any integer type (any of the four
// integer types, when the value fits), interface{} (the value as Message
// gives it), a type implementing encoding.TextUnmarshaler (from STRING or
// BINARY), or a pointer to one of these. Fields without a tag, and those
// tagged "-", are left alone.
//
// Every tagged argument must be there and not NULL (HAProxy sends NULL when
// a fetch fails or a header is absent), except in a pointer field, which
// is left nil, and in a field tagged ",optional", which is left as it is.
// Otherwise Bind returns an *ArgError naming the argument and the problem,
// having set the fields before it. Of several arguments with one name, the
// first counts. What Bind stores is a copy: it stays valid after the
// handler returns.
func (m Message) Bind(v interface{}) error {
	plan, target, err := bindTarget(v)
	if err != nil {
		return err
	}
	for i := range plan.fields {
		f := &plan.fields[i]
		arg, present := m.Args[f.arg]
		val := Value{}
		if present {
			val = valueOf(arg)
		}
		if err := f.set(target, m.Name, val, present); err != nil {
			return err
		}
	}
	return nil
}

// Bind is Message.Bind on the zero-copy path: it reads the current
// message's arguments from the frame and copies what it stores.
func (it *MessageIterator) Bind(v interface{}) error {
	plan, target, err := bindTarget(v)
	if err != nil {
		return err
	}
	for i := range plan.fields {
		f := &plan.fields[i]
		val, present := it.Arg(f.arg)
		if err := f.set(target, it.Name(), val, present); err != nil {
			return err
		}
	}
	return nil
}

// valueOf is the Value of an argument of the simple API.
func valueOf(x interface{}) Value {
	switch x := x.(type) {
	case bool:
		if x {
			return Value{typ: TypeBool, num: 1}
		}
		return Value{typ: TypeBool}
	case int32:
		return Value{typ: TypeInt32, num: uint64(uint32(x))}
	case uint32:
		return Value{typ: TypeUint32, num: uint64(x)}
	case int64:
		return Value{typ: TypeInt64, num: uint64(x)}
	case uint64:
		return Value{typ: TypeUint64, num: x}
	case net.IP:
		if len(x) == net.IPv4len {
			return Value{typ: TypeIPv4, data: x}
		}
		return Value{typ: TypeIPv6, data: x.To16()}
	case string:
		return Value{typ: TypeString, data: []byte(x)}
	case []byte:
		return Value{typ: TypeBinary, data: x}
	}
	return Value{}
}

// bindPlan is what Bind knows of a struct type.
type bindPlan struct {
	fields []bindField
}

type bindField struct {
	index    int
	name     string // the Go field's name
	arg      string
	optional bool
	ptr      bool // a pointer field: allocated when the argument is there
	kind     bindKind
	typ      reflect.Type // the field's type, or the pointed-to type
}

type bindKind uint8

const (
	bindString bindKind = iota
	bindBytes
	bindIP
	bindAddr
	bindBool
	bindInt
	bindUint
	bindAny
	bindText
)

var bindPlans sync.Map // reflect.Type -> *bindPlan or error

var (
	typeIP        = reflect.TypeOf(net.IP(nil))
	typeAddr      = reflect.TypeOf(netip.Addr{})
	typeUnmarshal = reflect.TypeOf((*encoding.TextUnmarshaler)(nil)).Elem()
)

// bindTarget checks that v is a non-nil pointer to a struct and returns
// the plan of the struct's type and the struct.
func bindTarget(v interface{}) (*bindPlan, reflect.Value, error) {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() || rv.Elem().Kind() != reflect.Struct {
		return nil, reflect.Value{}, fmt.Errorf("spoe: Bind needs a non-nil pointer to a struct, not %T", v)
	}
	t := rv.Elem().Type()
	p, ok := bindPlans.Load(t)
	if !ok {
		plan, err := makeBindPlan(t)
		if err != nil {
			p = err
		} else {
			p = plan
		}
		bindPlans.Store(t, p)
	}
	if err, ok := p.(error); ok {
		return nil, reflect.Value{}, err
	}
	return p.(*bindPlan), rv.Elem(), nil
}

func makeBindPlan(t reflect.Type) (*bindPlan, error) {
	plan := &bindPlan{}
	for i := 0; i < t.NumField(); i++ {
		sf := t.Field(i)
		tag, ok := sf.Tag.Lookup("spoe")
		if !ok || tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		f := bindField{index: i, name: sf.Name, arg: name, typ: sf.Type}
		switch opts {
		case "":
		case "optional":
			f.optional = true
		default:
			return nil, fmt.Errorf("spoe: Bind: field %s.%s: unknown tag option %q (want \"optional\")", t, sf.Name, opts)
		}
		if !sf.IsExported() {
			return nil, fmt.Errorf("spoe: Bind: field %s.%s is tagged but not exported", t, sf.Name)
		}
		if f.typ.Kind() == reflect.Pointer {
			f.ptr, f.typ = true, f.typ.Elem()
		}
		kind, ok := bindKindOf(f.typ)
		if !ok {
			return nil, fmt.Errorf("spoe: Bind: field %s.%s: type %s cannot hold an SPOP value", t, sf.Name, sf.Type)
		}
		f.kind = kind
		plan.fields = append(plan.fields, f)
	}
	return plan, nil
}

func bindKindOf(t reflect.Type) (bindKind, bool) {
	switch {
	case t == typeIP:
		return bindIP, true
	case t == typeAddr:
		return bindAddr, true
	case reflect.PointerTo(t).Implements(typeUnmarshal):
		return bindText, true
	}
	switch t.Kind() {
	case reflect.String:
		return bindString, true
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return bindBytes, true
		}
	case reflect.Bool:
		return bindBool, true
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return bindInt, true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return bindUint, true
	case reflect.Interface:
		if t.NumMethod() == 0 {
			return bindAny, true
		}
	}
	return 0, false
}

// set stores val, the argument as found (present reports whether it was),
// in the field of target.
func (f *bindField) set(target reflect.Value, msg string, val Value, present bool) error {
	fail := func(reason string) error {
		return &ArgError{Message: msg, Arg: f.arg, Field: f.name, Reason: reason}
	}
	field := target.Field(f.index)
	if !present || val.IsNull() {
		if f.ptr {
			field.SetZero()
			return nil
		}
		if f.optional {
			return nil
		}
		if !present {
			return fail("missing")
		}
		return fail("NULL (HAProxy's fetch found nothing)")
	}
	dst := field
	if f.ptr {
		dst = reflect.New(f.typ).Elem()
	}
	wrongType := func() error {
		return fail(fmt.Sprintf("is %s, field is %s", val.Type(), field.Type()))
	}
	switch f.kind {
	case bindString, bindBytes, bindText:
		b, ok := val.Bytes()
		if !ok {
			return wrongType()
		}
		switch f.kind {
		case bindString:
			dst.SetString(string(b))
		case bindBytes:
			dst.SetBytes(append([]byte{}, b...))
		case bindText:
			if err := dst.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText(b); err != nil {
				return fail(err.Error())
			}
		}
	case bindIP:
		addr, ok := val.Addr()
		if !ok {
			return wrongType()
		}
		dst.Set(reflect.ValueOf(net.IP(addr.AsSlice())))
	case bindAddr:
		addr, ok := val.Addr()
		if !ok {
			return wrongType()
		}
		dst.Set(reflect.ValueOf(addr))
	case bindBool:
		b, ok := val.Bool()
		if !ok {
			return wrongType()
		}
		dst.SetBool(b)
	case bindInt:
		n, ok := val.Int()
		if !ok {
			if _, isUint := val.Uint(); !isUint {
				return wrongType()
			}
			return fail(fmt.Sprintf("%d overflows %s", val.num, field.Type()))
		}
		if dst.OverflowInt(n) {
			return fail(fmt.Sprintf("%d overflows %s", n, field.Type()))
		}
		dst.SetInt(n)
	case bindUint:
		n, ok := val.Uint()
		if !ok {
			if i, isInt := val.Int(); isInt {
				return fail(fmt.Sprintf("%d is negative, field is %s", i, field.Type()))
			}
			return wrongType()
		}
		if dst.OverflowUint(n) {
			return fail(fmt.Sprintf("%d overflows %s", n, field.Type()))
		}
		dst.SetUint(n)
	case bindAny:
		dst.Set(reflect.ValueOf(val.Interface()))
	}
	if f.ptr {
		field.Set(dst.Addr())
	}
	return nil
}
