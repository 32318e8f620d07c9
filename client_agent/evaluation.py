"""Local evaluation of each round's global client adapters on this agent's held-out examples.

It runs after the FedAvg download, so it scores the new global client adapters with the server's current
adapters, through forward-only eval messages (`remote_score_fn`). The round is closed by then (its straggler
deadline never waits on evaluation), which the backend allows for eval uploads
(`flglm.step_protocol.EVAL_ROUND_RULE`) and for the repeated round-done report. It uses at most
`eval_examples` held-out examples (job hyperparameter, default 32; 0 turns it off) and, for generation,
`eval_max_new_tokens` (default 16) greedy tokens. Only aggregate numbers are reported (eval_loss,
eval_examples, accuracy with its 95 % interval or rouge_l); raw text, token ids, labels and logits stay here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from client_agent.job_data import JobData
from flglm.agent_step import ClientChannel, remote_score_fn
from flglm.round_eval import classification_eval_metrics, round_eval_metrics
from flglm.step_client import StepHttpError
from flglm.trainers import ClientSideTrainer

log = logging.getLogger("flglm.agent")


@dataclass(frozen=True)
class RoundEvaluation:
    """One job's local evaluation: its held-out data and the job's eval settings."""

    job_id: int
    task: str
    data: JobData
    batch_size: int
    eval_examples: int  # at most this many held-out examples; 0 turns evaluation off
    eval_max_new_tokens: int

    def metrics(
        self, trainer: ClientSideTrainer, channel: ClientChannel, round_number: int
    ) -> dict[str, float]:
        """Eval metrics of the model the client parts hold now (after FedAvg: the global model of the round),
        on at most `eval_examples` held-out examples; {} when off, without eval data, or when the server
        refuses (e.g. this client was dropped), which is logged and never stops training."""
        if self.eval_examples <= 0 or not self.data.held_out:
            return {}
        score_fn = remote_score_fn(trainer, channel, round_number)
        prepared = self.data.classification_eval
        try:
            if prepared is not None:
                return classification_eval_metrics(
                    score_fn, prepared, batch_size=self.batch_size, pad_token_id=self.data.pad_token_id
                )
            return round_eval_metrics(
                score_fn,
                self.data.held_out,
                self.data.tokenizer,
                task=self.task,
                max_length=self.data.max_seq_len,
                batch_size=self.batch_size,
                pad_token_id=self.data.pad_token_id,
                label_set=self.data.label_set,
                max_examples=self.eval_examples,
                max_new_tokens=self.eval_max_new_tokens,
            )
        except (StepHttpError, TimeoutError) as exc:
            log.warning("job %d: round %d evaluation skipped: %s", self.job_id, round_number, exc)
            return {}
