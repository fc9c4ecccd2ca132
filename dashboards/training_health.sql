-- Training health per run and iteration, the numbers to look at before trusting a curve:
--   training step (train_steps, means over the iteration's optimizer steps): each loss part, PPO
--     clip fraction, approximate KL (old - new), token entropy of the policy on the trained
--     completions, gradient norm (mean and max, before clipping), learning rate (last step),
--     gate-open fraction (kepo), skipped steps;
--   samples (rollouts, on-policy samples only): mean completion length in tokens and the
--     truncation rate (finish_reason = 'length': the sample hit max_new_tokens);
--   groups (prompts / trained rollouts): the all-wrong rate (no on-policy sample with accuracy 1)
--     and the zero-advantage rate (every trained row of the prompt has advantage 0: no policy
--     gradient from that prompt; NULL where no row carries an advantage: sft, gkd);
--   sampler vs trainer: |generation-time log-prob - recomputed old log-prob| per token, over the
--     on-policy samples (sampled under the same plain prompt the trainer scores them under), mean
--     and max. Near 0 on a sound setup; a large value means the sampler (vLLM / HF generate) and
--     the trainer's forward disagree (dtype, template, processor, weights not reloaded);
--   stage durations (stages, succeeded stages, seconds): rollout and train of iteration k, and
--     the evaluation of policy version k (the `iteration` of an evaluate stage is the version).
WITH keys AS (
    SELECT run_id, iteration FROM train_steps
    UNION
    SELECT run_id, iteration FROM rollouts
    UNION
    SELECT run_id, iteration FROM stages WHERE stage IN ('rollout', 'train', 'evaluate')
),
steps AS (
    SELECT
        run_id,
        iteration,
        count(*) AS n_steps,
        count(*) FILTER (WHERE skipped) AS n_skipped,
        avg(loss_total) AS loss_total,
        avg(loss_pg) AS loss_pg,
        avg(loss_kl) AS loss_kl,
        avg(loss_distill) AS loss_distill,
        avg(loss_sft) AS loss_sft,
        avg(clipfrac) AS clipfrac,
        avg(approx_kl) AS approx_kl,
        avg(entropy) AS entropy,
        avg(grad_norm) AS grad_norm,
        max(grad_norm) AS grad_norm_max,
        arg_max(lr, step) AS lr,
        avg(gate_frac_open) AS gate_frac_open
    FROM train_steps
    GROUP BY run_id, iteration
),
samples AS (
    SELECT
        run_id,
        iteration,
        count(*) AS n_samples,
        avg(n_tokens) AS mean_completion_tokens,
        avg((finish_reason = 'length')::INT) AS truncation_rate
    FROM rollouts
    WHERE source = 'policy'
    GROUP BY run_id, iteration
),
groups AS (
    SELECT
        p.run_id,
        p.iteration,
        count(*) AS n_prompts,
        avg((p.n_policy_correct = 0)::INT) AS all_wrong_rate,
        avg((a.max_abs_advantage = 0)::INT) AS zero_advantage_rate
    FROM prompts AS p
    LEFT JOIN (
        SELECT run_id, iteration, prompt_id, max(abs(advantage)) AS max_abs_advantage
        FROM rollouts
        WHERE trained
        GROUP BY run_id, iteration, prompt_id
    ) AS a ON a.run_id = p.run_id AND a.iteration = p.iteration AND a.prompt_id = p.prompt_id
    GROUP BY p.run_id, p.iteration
),
token_pairs AS (
    SELECT
        run_id,
        iteration,
        unnest(sampled_logprobs) AS sampled,
        unnest(old_logprobs) AS recomputed
    FROM rollouts
    WHERE source = 'policy' AND old_logprobs IS NOT NULL
),
mismatch AS (
    SELECT
        run_id,
        iteration,
        avg(abs(sampled - recomputed)) AS logprob_mismatch_mean,
        max(abs(sampled - recomputed)) AS logprob_mismatch_max
    FROM token_pairs
    GROUP BY run_id, iteration
),
durations AS (
    SELECT
        run_id,
        iteration,
        max(epoch(finished_at) - epoch(started_at)) FILTER (WHERE stage = 'rollout') AS rollout_s,
        max(epoch(finished_at) - epoch(started_at)) FILTER (WHERE stage = 'train') AS train_s,
        max(epoch(finished_at) - epoch(started_at)) FILTER (WHERE stage = 'evaluate') AS evaluate_s
    FROM stages
    WHERE status = 'succeeded'
    GROUP BY run_id, iteration
)
SELECT
    k.run_id,
    r.method_label,
    k.iteration,
    s.n_steps,
    s.n_skipped,
    round(s.loss_total, 6) AS loss_total,
    round(s.loss_pg, 6) AS loss_pg,
    round(s.loss_kl, 6) AS loss_kl,
    round(s.loss_distill, 6) AS loss_distill,
    round(s.loss_sft, 6) AS loss_sft,
    round(s.clipfrac, 6) AS clipfrac,
    round(s.approx_kl, 6) AS approx_kl,
    round(s.entropy, 6) AS entropy,
    round(s.grad_norm, 6) AS grad_norm,
    round(s.grad_norm_max, 6) AS grad_norm_max,
    s.lr,
    round(s.gate_frac_open, 4) AS gate_frac_open,
    o.n_samples,
    round(o.mean_completion_tokens, 2) AS mean_completion_tokens,
    round(o.truncation_rate, 4) AS truncation_rate,
    g.n_prompts,
    round(g.all_wrong_rate, 4) AS all_wrong_rate,
    round(g.zero_advantage_rate, 4) AS zero_advantage_rate,
    round(m.logprob_mismatch_mean, 6) AS logprob_mismatch_mean,
    round(m.logprob_mismatch_max, 6) AS logprob_mismatch_max,
    round(d.rollout_s, 2) AS rollout_s,
    round(d.train_s, 2) AS train_s,
    round(d.evaluate_s, 2) AS evaluate_s
FROM keys AS k
JOIN runs AS r ON r.run_id = k.run_id
LEFT JOIN steps AS s ON s.run_id = k.run_id AND s.iteration = k.iteration
LEFT JOIN samples AS o ON o.run_id = k.run_id AND o.iteration = k.iteration
LEFT JOIN groups AS g ON g.run_id = k.run_id AND g.iteration = k.iteration
LEFT JOIN mismatch AS m ON m.run_id = k.run_id AND m.iteration = k.iteration
LEFT JOIN durations AS d ON d.run_id = k.run_id AND d.iteration = k.iteration
ORDER BY r.created_at, k.run_id, k.iteration
