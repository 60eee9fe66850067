"""What the checks found: the ``validation_details`` of a refused or accepted push."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass(frozen=True)
class Issue:
    check: str  # "syntax", "dangerous", "protected_import", "dependency", "runtime", "style", "storage"
    message: str
    line: Optional[int] = None

    def text(self) -> str:
        return f"{self.message} (line {self.line})" if self.line else self.message

    def as_dict(self) -> Dict[str, object]:
        return {"check": self.check, "message": self.message, "line": self.line}


@dataclass
class CheckReport:
    """What the checks found. ``errors`` refuse the push; ``warnings`` are reported only."""

    errors: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors

    def details(self) -> Dict[str, object]:
        """The ``validation_details`` reply field: the seed's three keys, plus structured issues."""
        return {
            "valid": self.valid,
            "errors": [issue.text() for issue in self.errors],
            "warnings": [issue.text() for issue in self.warnings],
            "issues": [issue.as_dict() for issue in self.errors + self.warnings],
        }
