#!/usr/bin/env bash
# Build .launchpkg/ (ignored by .gitignore): what bench/gpu_launch.sh needs on a machine without sshd,
# ssh, pdsh or rsync (a bare GPU machine): those binaries from this Debian machine with
# every library they load except glibc's, pdsh's modules, and wheels for the submitting side
# (fabric, paramiko and their needs) for CPython 3.12. Run as root on Debian 12 with pdsh installed.
#
#   bash bench/launchpkg.sh && (on the GPU machine) bash bench/gpu_launch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P=.launchpkg
rm -rf "$P" && mkdir -p "$P/bin" "$P/lib" "$P/pdsh" "$P/whl"
bins=(/usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen /usr/lib/openssh/sftp-server /usr/bin/pdsh.bin /usr/bin/rsync)
cp "${bins[@]}" "$P/bin/"
cp /usr/lib/x86_64-linux-gnu/pdsh/*.so "$P/pdsh/"
for f in "${bins[@]}" /usr/lib/x86_64-linux-gnu/pdsh/*.so; do
    ldd "$f" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -v -E '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux-x86-64)\.so' | xargs -I{} cp -L {} "$P/lib/"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --abi cp312 --abi abi3 --abi none -d "$P/whl" \
    fabric==3.2.3 paramiko==5.1.0 invoke==2.2.1 cryptography==50.0.2 bcrypt==5.0.0 PyNaCl==1.6.2 \
    cffi==2.1.1 pycparser==3.12 decorator==5.3.1 Deprecated==1.3.1
du -sh "$P"; ls "$P"/*
