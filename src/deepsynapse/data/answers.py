"""Extracting and comparing numeric final answers.

Rewards hinge on deciding whether a model's answer equals the gold answer, so the
normalisation here has to be forgiving about surface form ("$1,000.00", "1000 dollars",
"\\boxed{1000}") while staying exact about value. Everything runs in linear time and never
raises on string input, because completions can be arbitrarily long garbage.
"""

from __future__ import annotations

import decimal
import re
from collections import deque
from fractions import Fraction

__all__ = ["answers_match", "gsm8k_gold_answer", "normalize_answer"]

# Digits of a fraction part are bounded so that int() never meets Python's limit on
# integer string conversion; longer runs fall through to the plain-number branch.
_DENOM = r"(?=[0-9]{0,29}[1-9])[0-9]{1,30}(?![0-9])"  # 1-30 digits, not all zeros

# One token per number. No quantifier is nested inside another unbounded one, and every
# alternative can only start at the beginning of a digit run, so a scan is linear.
_NUMBER_RE = re.compile(
    rf"""
    (?:(?<![\w)\]}}.%])(?P<sign>[-+\u2212]))?   # a sign, unless it reads as a binary operator
    (?:[$\u20ac\u00a3][ ]?(?P<sign2>[-+\u2212])?)?  # currency symbol, maybe "$-5"
    (?<![0-9])                                  # never start inside a digit run
    (?:
        \\[dt]?frac\{{[ ]*(?P<tn>[0-9]{{1,30}})[ ]*\}}\{{[ ]*(?P<td>{_DENOM})[ ]*\}}
      | (?P<mw>[0-9]{{1,30}})[ ](?P<mn>[0-9]{{1,30}})/(?P<md>{_DENOM})(?![./][0-9])
      | (?P<fn>[0-9]{{1,30}}(?:\.[0-9]{{1,30}})?)[ ]?/[ ]?(?P<fd>{_DENOM})(?![./][0-9])
      | (?P<int>[0-9]{{1,3}}(?:,[0-9]{{3}})+(?![0-9])|[0-9]+)(?P<frac>\.[0-9]+)?
      | (?P<lead>\.[0-9]+)
    )
    """,
    re.VERBOSE,
)
_BRACES_RE = re.compile(r"[{}]")
_BOXED = "\\boxed{"
_ROUND_DECIMALS = 6
_REL_TOL = decimal.Decimal("1e-6")
_ABS_TOL = decimal.Decimal("1e-9")


def _plain_canonical(int_digits: str, frac_digits: str, negative: bool) -> str:
    """Canonical text of a decimal literal by string surgery.

    String work keeps this exact and avoids int() on digit runs of any length.
    """
    int_part = int_digits.replace(",", "").lstrip("0") or "0"
    frac_part = frac_digits.rstrip("0")
    text = f"{int_part}.{frac_part}" if frac_part else int_part
    if negative and text != "0":
        text = "-" + text
    return text


def _fraction_canonical(value: Fraction) -> str:
    """Exact decimal when the fraction terminates, else rounded half-up to 6 places."""
    negative = value < 0
    value = abs(value)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den == 1:
        places = max(twos, fives)
        scaled = value.numerator * 10**places // value.denominator
    else:
        places = _ROUND_DECIMALS
        scaled = int(value * 10**places + Fraction(1, 2))
    digits = str(scaled).rjust(places + 1, "0")
    int_digits, frac_digits = (digits[:-places], digits[-places:]) if places else (digits, "")
    return _plain_canonical(int_digits, frac_digits, negative)


def _match_canonical(m: re.Match[str]) -> str:
    """Canonical text of one number token found by `_NUMBER_RE`."""
    minus_signs = sum(s in ("-", "\u2212") for s in (m.group("sign"), m.group("sign2")))
    negative = minus_signs % 2 == 1
    if m.group("tn") is not None:
        value = Fraction(int(m.group("tn")), int(m.group("td")))
    elif m.group("mw") is not None:
        num, den = int(m.group("mn")), int(m.group("md"))
        # "2 5/3" is not a mixed number; read it as two numbers and keep the last.
        value = Fraction(num, den) + (int(m.group("mw")) if num < den else 0)
    elif m.group("fn") is not None:
        value = Fraction(m.group("fn")) / int(m.group("fd"))
    elif m.group("int") is not None:
        return _plain_canonical(m.group("int"), (m.group("frac") or ".")[1:], negative)
    else:
        return _plain_canonical("", m.group("lead")[1:], negative)
    return _fraction_canonical(-value if negative else value)


def _last_number(text: str) -> str | None:
    last = deque(_NUMBER_RE.finditer(text), maxlen=1)  # only the final match matters
    return _match_canonical(last[0]) if last else None


def _boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, the conventional explicit final answer."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    start += len(_BOXED)
    depth = 1
    for brace in _BRACES_RE.finditer(text, start):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start : brace.start()]
    return text[start:]


def normalize_answer(text: str | None) -> str | None:
    """Canonical numeric string of the final answer in ``text``, or None without a number.

    The last number wins because models narrate before concluding; a ``\\boxed{}`` answer
    wins over everything else. Integers carry no ".0"; fractions become exact decimals,
    or are rounded to 6 places when they do not terminate.

    >>> normalize_answer("The answer is $1,000.50 dollars.")
    '1000.5'
    >>> normalize_answer("18 apples and 3 oranges, so 21")
    '21'
    >>> normalize_answer("1 1/2"), normalize_answer("2/3"), normalize_answer("\\u22123")
    ('1.5', '0.666667', '-3')
    >>> normalize_answer("\\\\boxed{42}"), normalize_answer("50%"), normalize_answer(".5")
    ('42', '50', '0.5')
    >>> normalize_answer("no digits here") is None
    True
    """
    if not isinstance(text, str):
        return None
    try:
        boxed = _boxed_content(text)
        if boxed is not None:
            found = _last_number(boxed)
            if found is not None:
                return found
        return _last_number(text)
    except (ArithmeticError, ValueError):  # pragma: no cover - defensive; inputs are bounded
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether two answers denote the same number (relative tol 1e-6, absolute 1e-9).

    The tolerance absorbs rounding of repeating decimals ("0.333333" vs "1/3") without
    accepting answers that are merely close.

    >>> answers_match("$18.00", "18"), answers_match("18", "18.5"), answers_match(None, "1")
    (True, False, False)
    """
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        with decimal.localcontext() as ctx:
            ctx.prec = 50
            ctx.Emax = decimal.MAX_EMAX
            ctx.Emin = decimal.MIN_EMIN
            da, db = decimal.Decimal(a), decimal.Decimal(b)
            scale = max(abs(da), abs(db))
            return abs(da - db) <= max(_REL_TOL * scale, _ABS_TOL)
    except (ArithmeticError, ValueError):  # pragma: no cover - defensive
        return False


def gsm8k_gold_answer(answer_field: str) -> str:
    """Normalised final answer after the last ``####`` of a GSM8K solution.

    Raises instead of returning None because a gold answer without a number is a data
    error that must not silently become "every prediction is wrong".

    >>> gsm8k_gold_answer("48/2 = <<48/2=24>>24 clips.\\n#### 1,080")
    '1080'
    """
    marker = answer_field.rfind("####")
    if marker < 0:
        raise ValueError("no '####' marker in GSM8K answer")
    value = normalize_answer(answer_field[marker + 4 :])
    if value is None:
        raise ValueError("no number after the last '####' in GSM8K answer")
    return value
