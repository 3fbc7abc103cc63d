#!/usr/bin/env bash
# TorchServe on a machine with no Java and no package index (the GPU device machine), in a
# small enough bundle to travel with the working tree (64 MiB a call):
#   bash bench/torchserve_carry.sh pack DIR      # here: needs a JDK (jlink) and the venv's torchserve
#   source bench/torchserve_carry.sh install DIR # there: JAVA_HOME, PATH and PYTHONPATH set
# pack writes DIR/jre.tar.xz (a jlink runtime with the modules TorchServe's frontend uses, about
# 13 MB) and DIR/ts.tar.xz (the ts and model_archiver packages with the frontend jar unpacked:
# the jar is already deflated, 46 MB; its files xz-compressed are about 19 MB). install unpacks
# both under /tmp/ts, zips the jar again (stored), and writes the two console scripts.
set -u
verb=${1:?pack|install}; DIR=${2:?bundle folder}
MODULES=java.base,java.desktop,java.logging,java.management,java.naming,java.net.http,java.sql,java.xml,java.scripting,java.instrument,java.security.jgss,jdk.unsupported,jdk.crypto.ec,jdk.management,jdk.zipfs
case $verb in
pack)
  set -e
  site=$(.venv/bin/python -c 'import ts, os; print(os.path.dirname(os.path.dirname(ts.__file__)))')
  tmp=$(mktemp -d); mkdir -p "$DIR"
  jlink --add-modules "$MODULES" --strip-debug --no-header-files --no-man-pages --compress=0 --output "$tmp/jre"
  tar -C "$tmp" -cf - jre | xz -9 -T0 > "$DIR/jre.tar.xz"
  mkdir -p "$tmp/site/jar"
  cp -r "$site/ts" "$site/model_archiver" "$tmp/site/"
  rm -f "$tmp/site/ts/frontend/model-server.jar"
  (cd "$tmp/site/jar" && unzip -q "$site/ts/frontend/model-server.jar")
  tar -C "$tmp/site" --exclude=__pycache__ -cf - ts model_archiver jar | xz -9 -T0 > "$DIR/ts.tar.xz"
  rm -rf "$tmp"; ls -l "$DIR"
  ;;
install)
  T=/tmp/ts; mkdir -p $T/site $T/bin
  tar -C $T -xJf "$DIR/jre.tar.xz" && tar -C $T/site -xJf "$DIR/ts.tar.xz" || return 1 2>/dev/null || exit 1
  python3 - $T/site <<'EOF'
import os, sys, zipfile
site = sys.argv[1]; src = os.path.join(site, "jar")
with zipfile.ZipFile(os.path.join(site, "ts/frontend/model-server.jar"), "w", zipfile.ZIP_STORED) as z:
    z.write(os.path.join(src, "META-INF/MANIFEST.MF"), "META-INF/MANIFEST.MF")
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f); rel = os.path.relpath(p, src)
            if rel != "META-INF/MANIFEST.MF":
                z.write(p, rel)
EOF
  for s in "torchserve ts.model_server start" "torch-model-archiver model_archiver.model_packaging generate_model_archive"; do
    set -- $s
    printf '#!/usr/bin/env python3\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "$2" "$3" "$3" > $T/bin/$1
    chmod +x $T/bin/$1
  done
  export JAVA_HOME=$T/jre PATH=$T/bin:$PATH PYTHONPATH=$T/site${PYTHONPATH:+:$PYTHONPATH}
  "$JAVA_HOME/bin/java" -version 2>&1 | head -1
  ;;
*) echo "usage: $0 pack|install DIR" >&2; exit 2 ;;
esac
