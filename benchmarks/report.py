"""What the benchmark scripts print and write: one JSON line per record (to
stdout and, on request, a `.jsonl` file), then a Markdown table."""

import datetime
import json
import os
import platform


def run_record(command, **fields):
    """The first record of a run: when, what command, on what machine."""
    return {"kind": "run", "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "machine": platform.machine(),
        "cpus": os.cpu_count(), **fields}


class Report:
    """Collects records, printing each as a JSON line as it comes."""

    def __init__(self, jsonl=None, markdown=None):
        self.records = []
        self._jsonl = open(jsonl, "w") if jsonl else None
        self._markdown = markdown

    def emit(self, record):
        self.records.append(record)
        print(json.dumps(record), flush=True)
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def finish(self, table):
        """Closes the JSON lines, prints `table` and writes it to the
        Markdown file if one was asked for."""
        if self._jsonl:
            self._jsonl.close()
        print(table)
        if self._markdown:
            with open(self._markdown, "w") as f:
                f.write(table)


def cpu_name():
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what
    `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
