# Install the library, header, pkg-config file and binaries:
#   make install PREFIX=/usr/local        (DESTDIR is honoured too)
# Afterwards: cc app.c $(pkg-config --cflags --libs coda)
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
BINDIR ?= $(PREFIX)/bin
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
CARGO ?= cargo
# release (default) or debug: which cargo profile to build and install.
PROFILE ?= release

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR := $(firstword $(subst ., ,$(VERSION)))

.PHONY: build install uninstall

build:
	$(CARGO) build $(if $(filter release,$(PROFILE)),--release,)

install: build
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(PKGCONFIGDIR)
	install -m 0755 target/$(PROFILE)/libcoda.so $(DESTDIR)$(LIBDIR)/libcoda.so.$(VERSION)
	ln -sf libcoda.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libcoda.so.$(MAJOR)
	ln -sf libcoda.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/libcoda.so
	install -m 0644 target/$(PROFILE)/libcoda.a $(DESTDIR)$(LIBDIR)/libcoda.a
	install -m 0644 include/coda.h $(DESTDIR)$(INCLUDEDIR)/coda.h
	install -m 0755 target/$(PROFILE)/coda-server $(DESTDIR)$(BINDIR)/coda-server
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' -e 's|@VERSION@|$(VERSION)|g' \
	    coda.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/coda.pc

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libcoda.so* $(DESTDIR)$(LIBDIR)/libcoda.a \
	      $(DESTDIR)$(INCLUDEDIR)/coda.h $(DESTDIR)$(BINDIR)/coda-server \
	      $(DESTDIR)$(PKGCONFIGDIR)/coda.pc
