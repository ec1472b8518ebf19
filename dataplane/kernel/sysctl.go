package kernel

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// procSysctl reads sysctls from /proc/sys and writes them, where it can,
// through netlink: a container that is not privileged has a read-only
// /proc/sys whatever its capabilities, while NET_ADMIN may still set an
// interface's IPv4 devconf with RTM_SETLINK. Keys netlink cannot set are
// written to /proc/sys.
type procSysctl struct{ inNS iptables.InNS }

// ipv4DevconfIndex is IPV4_DEVCONF_* (include/uapi/linux/ip.h) of the
// per-interface keys we set; x/sys/unix does not define them.
var ipv4DevconfIndex = map[string]uint16{
	"rp_filter":    8,
	"accept_local": 23,
}

func sysctlPath(key string) string {
	return filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
}

func (p procSysctl) Get(key string) (string, error) {
	var v []byte
	err := p.inNS(func() error {
		var err error
		v, err = os.ReadFile(sysctlPath(key))
		return err
	})
	return strings.TrimSpace(string(v)), err
}

func (p procSysctl) Set(key, value string) error {
	return p.inNS(func() error {
		if dev, idx, ok := ipv4Devconf(key); ok {
			var v uint32
			if _, err := fmt.Sscan(value, &v); err != nil {
				return fmt.Errorf("sysctl %s=%q: not a number", key, value)
			}
			if err := setIPv4Devconf(dev, idx, v); err != nil {
				return fmt.Errorf("sysctl %s=%s through netlink: %w", key, value, err)
			}
			return nil
		}
		return os.WriteFile(sysctlPath(key), []byte(value), 0o644)
	})
}

// ipv4Devconf splits net.ipv4.conf.<dev>.<name> for a real interface (not
// "all" or "default", which netlink cannot set) and a name it can set.
func ipv4Devconf(key string) (dev string, idx uint16, ok bool) {
	rest, found := strings.CutPrefix(key, "net.ipv4.conf.")
	if !found {
		return "", 0, false
	}
	i := strings.LastIndexByte(rest, '.')
	if i <= 0 {
		return "", 0, false
	}
	dev, name := rest[:i], rest[i+1:]
	idx, ok = ipv4DevconfIndex[name]
	if !ok || dev == "all" || dev == "default" {
		return "", 0, false
	}
	return dev, idx, true
}

// setIPv4Devconf sets one IPv4 devconf value of dev in the calling
// thread's netns: RTM_SETLINK with IFLA_AF_SPEC → AF_INET → IFLA_INET_CONF.
func setIPv4Devconf(dev string, idx uint16, v uint32) error {
	link, err := net.InterfaceByName(dev)
	if err != nil {
		return err
	}
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(link.Index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	conf := spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil)
	conf.AddRtAttr(int(idx), nl.Uint32Attr(v))
	req.AddData(spec)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		if errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("link %s is gone: %w", dev, err)
		}
		return err
	}
	return nil
}
