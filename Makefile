# make test      install what the tests need (Debian packages when root, the
#                pinned cbindgen, a Python venv with pytest), then cargo test
# make install   binaries, library, header, pkg-config file and man pages
#                (PREFIX=/usr/local by default; DESTDIR is honoured too)
# make build     cargo build --release, plus the libcoda.so.0 link that lets
#                programs linked against target/release start
# make deb       a Debian package in target/deb/ (dpkg-deb, no extra tools)
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
CARGO ?= cargo
# release (default) or debug: which cargo profile to build and install.
PROFILE ?= release
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
OUT := $(TARGET_DIR)/$(PROFILE)

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR := $(firstword $(subst ., ,$(VERSION)))
BINS := coda-server coda-mount coda
CBINDGEN_VERSION := 0.29.4
# The POSIX conformance suite tests/mount_pjdfstest.rs runs.
PJDFSTEST_VERSION := 0.2.2
# What the tests use from Debian 12 (see README, "Two commands").
DEB_DEPS := gcc g++ make pkg-config binutils git valgrind python3 python3-venv \
	python3-pip fuse3 nginx e2fsprogs ca-certificates \
	tar rsync autoconf automake bindfs
PYENV := $(TARGET_DIR)/pyenv

.PHONY: build install uninstall test deps deb

build:
	$(CARGO) build $(if $(filter release,$(PROFILE)),--release,)
	ln -sf libcoda.so $(OUT)/libcoda.so.$(MAJOR)

install: build
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(BINDIR) \
	    $(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	install -m 0755 $(OUT)/libcoda.so $(DESTDIR)$(LIBDIR)/libcoda.so.$(VERSION)
	ln -sf libcoda.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libcoda.so.$(MAJOR)
	ln -sf libcoda.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/libcoda.so
	install -m 0644 $(OUT)/libcoda.a $(DESTDIR)$(LIBDIR)/libcoda.a
	install -m 0644 include/coda.h $(DESTDIR)$(INCLUDEDIR)/coda.h
	for b in $(BINS); do install -m 0755 $(OUT)/$$b $(DESTDIR)$(BINDIR)/$$b; done
	install -m 0644 man/coda.1 $(DESTDIR)$(MANDIR)/man1/coda.1
	install -m 0644 man/coda-server.8 man/coda-mount.8 $(DESTDIR)$(MANDIR)/man8/
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' -e 's|@VERSION@|$(VERSION)|g' \
	    coda.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/coda.pc
	@echo "installed in $(DESTDIR)$(PREFIX). Programs find libcoda.so.$(MAJOR) once"
	@echo "  $(LIBDIR) is in the loader's path: run ldconfig as root (Debian has"
	@echo "  /usr/local/lib there), else export LD_LIBRARY_PATH=$(LIBDIR)."
	@echo "  pkg-config finds coda.pc under /usr/local and /usr; elsewhere:"
	@echo "  export PKG_CONFIG_PATH=$(PKGCONFIGDIR)"

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libcoda.so* $(DESTDIR)$(LIBDIR)/libcoda.a \
	      $(DESTDIR)$(INCLUDEDIR)/coda.h $(DESTDIR)$(PKGCONFIGDIR)/coda.pc \
	      $(DESTDIR)$(MANDIR)/man1/coda.1 $(DESTDIR)$(MANDIR)/man8/coda-server.8 \
	      $(DESTDIR)$(MANDIR)/man8/coda-mount.8
	for b in $(BINS); do rm -f $(DESTDIR)$(BINDIR)/$$b; done

# Install what is missing: Debian packages (as root; otherwise name them),
# the pinned cbindgen, a venv with pytest and setuptools for the Python
# package's test, and a wheelhouse from which the README test's
# `pip install .` builds offline (PyPI, once; the tests need no network).
deps:
	@missing=""; for p in $(DEB_DEPS); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "installing:$$missing"; \
	        DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    else \
	        echo "missing Debian packages (not root, so not installing):$$missing"; \
	        echo "  sudo apt-get install$$missing"; \
	    fi; \
	fi
	@cbindgen --version 2>/dev/null | grep -qx "cbindgen $(CBINDGEN_VERSION)" || \
	    $(CARGO) install --locked cbindgen@$(CBINDGEN_VERSION)
	@pjdfstest --version 2>/dev/null | grep -qx "pjdfstest $(PJDFSTEST_VERSION)" || \
	    $(CARGO) install --locked pjdfstest@$(PJDFSTEST_VERSION)
	@test -x $(PYENV)/bin/pytest || { python3 -m venv $(PYENV) && \
	    $(PYENV)/bin/pip install -q --disable-pip-version-check pytest setuptools wheel; } || \
	    echo "could not make the venv $(PYENV) (python3-venv missing?): the Python tests will say so"
	@test -d $(TARGET_DIR)/wheelhouse || $(PYENV)/bin/pip download -q --disable-pip-version-check \
	    -d $(TARGET_DIR)/wheelhouse "setuptools>=70.1" wheel || \
	    echo "could not fill $(TARGET_DIR)/wheelhouse: the README test will say so"

# The README's test command.
test: deps
	$(CARGO) test

# The Debian package: `make install` into a staging tree, plus systemd
# units, then dpkg-deb. Output: target/deb/coda_VERSION_ARCH.deb.
DEB_ARCH = $(shell dpkg --print-architecture)
DEB_STAGE = $(TARGET_DIR)/deb/coda_$(VERSION)_$(DEB_ARCH)
deb:
	rm -rf $(DEB_STAGE)
	$(MAKE) install DESTDIR=$(abspath $(DEB_STAGE)) PREFIX=/usr LIBDIR=/usr/lib \
	    MANDIR=/usr/share/man PROFILE=$(PROFILE)
	gzip -9n $(DEB_STAGE)/usr/share/man/man1/*.1 $(DEB_STAGE)/usr/share/man/man8/*.8
	strip --strip-debug $(DEB_STAGE)/usr/bin/* $(DEB_STAGE)/usr/lib/libcoda.so.* $(DEB_STAGE)/usr/lib/libcoda.a
	install -d $(DEB_STAGE)/lib/systemd/system $(DEB_STAGE)/DEBIAN \
	    $(DEB_STAGE)/usr/share/doc/coda $(DEB_STAGE)/etc/coda
	install -m 0644 packaging/systemd/coda-server.service packaging/systemd/coda-mount@.service \
	    $(DEB_STAGE)/lib/systemd/system/
	install -m 0644 packaging/deb/mount.conf.example $(DEB_STAGE)/usr/share/doc/coda/
	install -m 0644 README.md CHANGELOG.md LICENSE-MIT LICENSE-APACHE $(DEB_STAGE)/usr/share/doc/coda/
	sed -e 's|@VERSION@|$(VERSION)|' -e 's|@ARCH@|$(DEB_ARCH)|' \
	    -e "s|@SIZE@|$$(du -sk $(DEB_STAGE) | cut -f1)|" \
	    packaging/deb/control > $(DEB_STAGE)/DEBIAN/control
	install -m 0755 packaging/deb/postinst packaging/deb/postrm $(DEB_STAGE)/DEBIAN/
	dpkg-deb --root-owner-group -Zxz --build $(DEB_STAGE) $(TARGET_DIR)/deb/
