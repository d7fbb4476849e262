#!/usr/bin/env python3
"""Reports Rust files over 800 lines and functions over 150 lines (STYLE.md, ARCHITECTURE.md).

Usage: scripts/check_sizes.py [--strict] [dir ...]   (default: every crate's src/)
A function's length runs from its `fn` line to its closing brace at the same indent; test
modules count like any code. With --strict, exits 1 when anything is over.
"""
import re
import sys
from pathlib import Path

FILE_MAX, FN_MAX = 800, 150
FN = re.compile(r'^(\s*)(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"[^"]*"\s+)?fn\s+(\w+)')


def functions(lines):
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m or line.rstrip().endswith(';'):
            continue
        indent = m.group(1)
        for j in range(i, len(lines)):
            if lines[j].startswith(indent + '}') and not lines[j].startswith(indent + '} else'):
                yield m.group(8), i + 1, j - i + 1
                break


def main(args):
    strict = '--strict' in args
    dirs = [a for a in args if a != '--strict'] or ['graph/src', 'kernels/src', 'runtime/src', 'models/src', 'capi/src', 'python/src', 'src']
    over = []
    for d in dirs:
        for path in sorted(Path(d).rglob('*.rs')):
            lines = path.read_text().splitlines()
            if len(lines) > FILE_MAX:
                over.append(f'{path}: {len(lines)} lines (file limit {FILE_MAX})')
            for name, start, n in functions(lines):
                if n > FN_MAX:
                    over.append(f'{path}:{start}: fn {name} is {n} lines (limit {FN_MAX})')
    print('\n'.join(over) if over else f'no file over {FILE_MAX} lines, no function over {FN_MAX} lines')
    return 1 if strict and over else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
