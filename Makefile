# blkif: every entry point sets itself up on a fresh Debian machine.
#   make test   install what the suite needs, then run all of it
#   make demo   the main job on embedded defaults (our xenstored + simulated Xen)
#   make lab    boot a real Xen 4.17 host in QEMU and prove us against Linux's drivers

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_TEST := libxen-dev gcc-multilib xenstore-utils liburing-dev libnbd-dev fio clang libclang-rt-14-dev systemd \
            busybox-static \
            qemu-utils qemu-system-common nbdkit python3-libnbd libfuse3-3
APT_LAB := qemu-system-x86 xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils \
           linux-image-amd64 busybox-static cpio e2fsprogs qemu-utils qemu-system-common \
           python3-libnbd
BUILD_INPUTS := setup.cfg setup.py pyproject.toml blkif/abi/_cffi_build.py $(wildcard blkif/abi/_cdefs/*.py) \
                $(wildcard blkif/abi/csrc/*.c) $(wildcard blkif/abi/csrc/*.h)

.PHONY: test demo lab bench fuzz apt-test apt-lab clean

test: apt-test $(VENV)/.installed $(VENV)/.libnbd
	$(PY) -m pytest $(PYTEST_ARGS)

# xenstored, the sim hypervisor, blkif serve and a guest, each a process; verified I/O.
demo: $(VENV)/.installed
	$(PY) -m blkif demo $(DEMO_ARGS)

# blkif against direct preadv/pwritev on its backing file, pattern by pattern (docs/bench.md).
bench: $(VENV)/.installed $(VENV)/.libnbd
	$(PY) -m blkif bench $(BENCH_ARGS)

# Every fuzz target ten minutes on its corpus in tests/fuzz-corpus: the C engine's
# (libFuzzer, ASan+UBSan), then the atheris ones (docs/reliability.md).
FUZZ_TARGETS := engine request xenbus
fuzz: $(VENV)/.installed
	for t in $(FUZZ_TARGETS); do \
	  $(PY) -m blkif.fuzzing --target $$t --seconds $(or $(FUZZ_SECONDS),600) || exit 1; done

lab: $(VENV)/.installed $(VENV)/.libnbd apt-lab
	$(PY) -m blkif lab

# apt packages are installed only when missing, and only as root (CI and dev machines are root).
apt-test:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_TEST)"
apt-lab:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_LAB)"

apt-install:
	@missing=$$(for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing apt packages: $$missing"; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends $$missing) >/tmp/blkif-apt.log 2>&1 \
	      || { tail -20 /tmp/blkif-apt.log; echo "apt-get install failed: $$missing" >&2; exit 1; }; \
	  else echo "warning: not root; missing apt packages: $$missing" >&2; fi; \
	fi

# The extension links liburing and libnbd: their apt packages come first.
$(VENV)/.installed: $(BUILD_INPUTS) | apt-test
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Debian's python3-libnbd (nbd.py and its extension, nothing else of
# dist-packages) made importable in the venv through a .pth file.
DEBIAN_PY := /usr/lib/python3/dist-packages
$(VENV)/.libnbd: $(VENV)/.installed
	@so=$(DEBIAN_PY)/libnbdmod$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	if [ ! -f $(DEBIAN_PY)/nbd.py ] || [ ! -f $$so ]; then \
	  echo "warning: no python3-libnbd for the venv's Python ($$so): NBD tests cannot run" >&2; \
	else \
	  mkdir -p $(VENV)/libnbd && ln -sf $(DEBIAN_PY)/nbd.py $$so $(VENV)/libnbd/ && \
	  $(PY) -c 'import site, sys; open(site.getsitepackages()[0] + "/debian-libnbd.pth", "w").write(sys.argv[1] + "\n")' \
	    $(abspath $(VENV)/libnbd) && \
	  $(PY) -c 'import nbd' && touch $@; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info blkif/abi/_ffi*.so blkif/abi/_ffi.c .pytest_cache .hypothesis
