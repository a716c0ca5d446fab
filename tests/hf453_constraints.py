"""transformers 4.53.3's ``ConstraintListState`` on given constraints and sequences (run by
tests/test_hf453.py in its virtual environment). Reads a JSON list of cases ``{"constraints":
[["phrase", ids] | ["disjunction", [ids, ...]], ...], "sequence": ids}`` on stdin; prints, for
each, the state's bank and completion after the sequence, the tokens ``advance()`` lists, and the
bank of a copy extended by each of them, all read as 4.53's ``step_sentence_constraint`` reads
them (after every copy has been extended)."""

import json
import sys

from transformers.generation.beam_constraints import ConstraintListState, DisjunctiveConstraint, PhrasalConstraint

results = []
for case in json.load(sys.stdin):
    made = [PhrasalConstraint(ids) if kind == "phrase" else DisjunctiveConstraint(ids)
            for kind, ids in case["constraints"]]
    state = ConstraintListState(made)
    state.reset(case["sequence"])
    bank, completed = state.get_bank(), state.completed
    tokens = (state.advance() or []) if not completed else []
    copies = []
    for token in tokens:
        copy = state.copy(stateful=True)
        copy.add(token)
        copies.append(copy)
    results.append({"bank": bank, "completed": completed, "tokens": tokens, "banks": [c.get_bank() for c in copies]})
json.dump(results, sys.stdout)
