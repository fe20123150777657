"""Medical red-flag layer: spot emergencies in a user's message and make sure the reply sends them to urgent care.

What it is: a bilingual (English / Chinese) keyword-and-regex detector with three context discounts:
  * negation right before a match in the same clause ("no chest pain", "没有胸痛", "denies sweating");
  * resolved or long-past events in the same clause ("went away last year", "3 years ago", "去年", "已经好了");
  * general, educational questions ("what are stroke symptoms in general", "for my essay", "中风有哪些症状").
Some categories need two findings in the same message (chest pain AND sweating / radiating pain; an allergen AND
airway swelling; an infant under 3 months AND a fever; pregnancy AND bleeding).

What it is not: a classifier. It has no real understanding of the text, so it will miss unusual phrasings, typos,
sarcasm and long-distance negation, and it will occasionally warn on a benign message (it errs on the side of
warning). It is a backstop for the model, never a replacement for clinical triage. Nothing here logs user text.

Public API: detect_red_flags(text) -> list[RedFlag]; has_urgent_guidance(reply) -> bool;
SafetyGuard(enabled, categories).ensure_guidance(user_text, reply) / .guidance_suffix(user_text, reply_so_far).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{CJK}]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]+")


def detect_language(text: str) -> str:
    """"zh" when CJK characters are at least as many as Latin words, else "en"."""
    cjk = len(_CJK_RE.findall(text))
    return "zh" if cjk and cjk >= len(_LATIN_WORD_RE.findall(text)) else "en"


# --------------------------------------------------------------------------------------------------------------
# Shared vocabulary
# --------------------------------------------------------------------------------------------------------------

_FEVER = (
    r"\bfevers?\b|\bfeverish\b|\bfebrile\b|\b(?:high )?temp(?:erature)?\b(?:\s+(?:of|is|was|at))?\s+"
    r"(?:3[89]|4[01]|10[0-6])(?:\.\d+)?|\b(?:3[89]|4[01])(?:\.\d+)?\s*°?\s*C\b|\b(?:100\.[4-9]|10[1-6])(?:\.\d+)?\s*°?\s*F\b"
    r"|发烧|发热|高烧|低烧|体温\s*(?:有|是|到|达)?\s*(?:3[89]|4[01])|(?:3[89]|4[01])(?:\.\d+)?\s*(?:度|℃|°C)"
)
_ZH_SMALL_NUM = "一二两三四五六七八九十"
_BREATHING_HARD = (
    r"(?:can'?t|cannot|can not|unable to|struggling to|fighting to|could ?n[o']t)\s+(?:breathe|catch (?:my|his|her|their) breath)"
    r"|\b(?:trouble|difficulty|difficulties|problems?|hard time)\s+breathing\b|\bhard to breathe\b|\bgasping\b"
    r"|呼吸困难|喘不上气|喘不过气|上不来气|透不过气|无法呼吸|不能呼吸"
)


@dataclass(frozen=True)
class RedFlagRule:
    """One category. It fires on any `any_of` hit, or when every group in `all_of` has a hit in the message.

    `exclude`: patterns whose match overlaps a hit cancel that hit ("food poisoning", "bleeding gums").
    `context_exclude`: patterns that cancel every hit in the same sentence segment ("period" for heavy bleeding).
    `guidance`: the urgent-care text per language ("en", "zh").
    """

    category: str
    guidance: dict[str, str]
    any_of: tuple[str, ...] = ()
    all_of: tuple[tuple[str, ...], ...] = ()
    exclude: tuple[str, ...] = ()
    context_exclude: tuple[str, ...] = ()

    def compiled(self) -> "_CompiledRule":
        return _CompiledRule(
            self,
            [_rx(p) for p in self.any_of],
            [[_rx(p) for p in group] for group in self.all_of],
            [_rx(p) for p in self.exclude],
            [_rx(p) for p in self.context_exclude],
        )


def _rx(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"bad red-flag pattern {pattern!r}: {e}") from e


@dataclass
class _CompiledRule:
    rule: RedFlagRule
    any_of: list[re.Pattern]
    all_of: list[list[re.Pattern]]
    exclude: list[re.Pattern]
    context_exclude: list[re.Pattern]


_EMERGENCY_EN = "call your local emergency number (911 in the US, 112 in Europe, 999 in the UK) or go to the nearest emergency department now"
_EMERGENCY_ZH = "请立即拨打急救电话120（或当地急救号码），或尽快前往最近的医院急诊"

DEFAULT_RULES: tuple[RedFlagRule, ...] = (
    RedFlagRule(
        "cardiac_chest_pain",
        guidance={
            "en": f"Chest pain with sweating, breathlessness, nausea or pain spreading to the arm, jaw or back can be a "
                  f"heart attack: {_EMERGENCY_EN}. Do not drive yourself.",
            "zh": f"胸痛伴出汗、气短、恶心，或疼痛向手臂、下颌、后背放射，可能是心肌梗死：{_EMERGENCY_ZH}，不要自己开车。",
        },
        any_of=(
            r"\bcrushing (?:chest )?(?:pain|pressure)\b",
            r"\b(?:having|had|is having|am having|might be having|think (?:i'?m|he'?s|she'?s) having) an? heart attack\b",
            r"(?:像|是|可能|怀疑|好像)(?:是)?(?:心梗|心肌梗[死塞]|心脏病发作)|心梗了|心脏病(?:发作|犯)了",
        ),
        all_of=(
            (
                r"\bchest (?:pain|pressure|tightness|discomfort|hurts?|is hurting|feels (?:tight|heavy))"
                r"|\b(?:pain|pressure|tightness|heaviness|discomfort|squeezing) in (?:my|his|her|their|the) chest\b|\b(?:my|his|her|their) chest (?:hurts|is hurting|feels tight|feels heavy)"
                r"|\btight(?:ness)? in (?:my|his|her|their|the) chest\b",
                r"胸痛|胸口(?:痛|疼|闷|发紧)|胸疼|胸闷|胸部(?:疼痛|压迫感|紧缩感|疼)|心口(?:痛|疼)|心前区(?:疼痛|痛)",
            ),
            (
                r"\bsweat\w*|\bclammy\b|\bradiat\w*|\bspread\w* (?:to|into|down)|\bleft arm\b|\bdown (?:my|his|her|their|the) arm\b"
                r"|\b(?:to|into) (?:my|his|her|their|the) (?:arm|jaw|neck|back|shoulder)\b|\bjaw\b|\bnause\w*|\bvomit\w*"
                r"|\bshort(?:ness)? of breath\b|\bbreathless\w*|\bfaint\w*|\blight-?headed\b|\bcrushing\b|\bsqueezing\b",
                r"出汗|冷汗|大汗|放射|左臂|左胳膊|左肩|下巴|下颌|后背|恶心|呕吐|气短|呼吸困难|喘不上气|喘不过气|头晕|晕倒|濒死感|压榨",
            ),
        ),
    ),
    RedFlagRule(
        "stroke",
        guidance={
            "en": f"Face drooping, arm weakness, slurred speech or sudden numbness, confusion or severe headache can be a "
                  f"stroke. Time matters: {_EMERGENCY_EN}, and note the time the symptoms started.",
            "zh": f"口角歪斜、一侧肢体无力、说话不清，或突然麻木、意识混乱、剧烈头痛，可能是脑卒中（中风）。时间就是大脑：{_EMERGENCY_ZH}，并记下症状开始的时间。",
        },
        any_of=(
            r"\b(?:face|mouth|smile)\b(?: \w+){0,4} (?:is |was |started |seems |looks )?(?:droop\w*|sagging|lopsided|crooked|uneven)",
            r"\bdroop\w* (?:face|mouth|smile|on one side)\b|\bone side of (?:my|his|her|their|the) face\b(?: \w+){0,2} (?:droop\w*|numb|sagging|weak|paraly\w*)",
            r"\bslurr\w*(?: (?:his|her|my|their))? (?:speech|words)\b|\bspeech (?:is |was |became |sounds |seems )?slurred\b|\bslurring\b",
            r"\b(?:weak\w*|numb\w*|paraly\w*|can'?t move)\b(?: \w+){0,3} (?:on|in|down) (?:one|the left|the right|his left|his right|her left|her right|my left|my right) side\b",
            r"\b(?:can'?t|cannot|unable to) (?:lift|raise) (?:my|his|her|their|one) (?:left |right )?arm\b",
            r"\bsudden\w*\b(?: \w+){0,4} (?:weak\w*|numb\w*|paraly\w*|confus\w*)|\bsudden\w*\b(?: \w+){0,3} (?:can'?t|cannot|unable to|trouble|difficulty) (?:speak|talk|speaking|talking|see|seeing|walk|walking)\b",
            r"\b(?:having|had|is having|am having|might be having) a stroke\b|\bthink (?:it'?s|this is|he'?s having|she'?s having|i'?m having) a stroke\b",
            r"\bworst headache of (?:my|his|her|their) life\b|\bthunderclap headache\b",
            r"口角歪斜|嘴角(?:歪|下垂)|嘴歪|脸歪|面部歪斜|口眼歪斜|一侧(?:脸|面部)(?:麻木|下垂|无力)",
            r"说话不清|口齿不清|言语不清|吐字不清|说话含糊|突然说不出话|突然(?:不能|无法)说话",
            r"一侧(?:手臂|胳膊|肢体|身体|手脚|手|腿)(?:突然)?(?:无力|麻木|不能动|抬不起来)|半边身(?:子|体)?(?:麻木|无力|不能动)|(?:胳膊|手臂)(?:突然)?抬不起来|半身不遂",
            r"(?:可能|好像|怀疑|是不是|像是)(?:中风|脑卒中|脑梗|卒中)|中风了|脑梗了",
            r"突然(?:剧烈|严重的?)头痛|一生中最(?:严重|剧烈)的头痛|炸裂(?:样|般)的?头痛",
        ),
    ),
    RedFlagRule(
        "suicide_self_harm",
        guidance={
            "en": "You deserve support right now. If you might act on thoughts of ending your life or hurting yourself, "
                  "call your local emergency number or go to the nearest emergency department now; in the US you can "
                  "also call or text 988 (Suicide & Crisis Lifeline). If you can, reach out to someone you trust and "
                  "do not stay alone.",
            "zh": "你现在值得被支持和帮助。如果你有结束生命或伤害自己的想法，请立即拨打120（或110），或前往最近的医院急诊；"
                  "也可以拨打当地的心理危机干预热线。请尽量联系一位你信任的人陪在身边，不要独自一人。",
        },
        any_of=(
            r"\b(?:kill|killing|hurt|hurting|harm|harming|cut|cutting) (?:myself|herself|himself|themselves)\b",
            r"\bsuicid(?:e|al)\b",
            r"\bend(?:ing)? (?:my|his|her|their) (?:own )?life\b|\bend(?:ing)? it all\b|\btak(?:e|ing) (?:my|his|her|their) (?:own )?life\b",
            r"\b(?:don'?t|do not) want to (?:live|be alive|wake up|exist)\b|\bno (?:point|reason) (?:in )?(?:living|to live)\b",
            r"\bbetter off dead\b|\bwant(?:s|ed)? to die\b|\bwish (?:i|he|she) (?:was|were) dead\b|\bself[- ]?harm\w*",
            r"自杀|想死|不想活|活着(?:没|没有)(?:意思|意义)|活不下去|结束(?:自己的)?生命|轻生|割腕|自残|伤害自己|一了百了",
        ),
        exclude=(r"\bsuicide prevention\b", r"自杀(?:率|预防|式)|预防自杀", r"得想死"),
    ),
    RedFlagRule(
        "anaphylaxis",
        guidance={
            "en": f"Swelling of the throat, tongue or lips or trouble breathing after an allergen can be anaphylaxis: use "
                  f"an adrenaline (epinephrine) auto-injector now if one is available, then {_EMERGENCY_EN}.",
            "zh": f"接触过敏原后出现喉咙、舌头或嘴唇肿胀或呼吸困难，可能是严重过敏反应（过敏性休克）：如有肾上腺素自动注射笔请立即使用，并{_EMERGENCY_ZH}。",
        },
        any_of=(
            r"\banaphyla\w+",
            r"\bused (?:my|his|her|their|an|the) epi-?pen\b",
            r"过敏性休克|严重过敏反应",
        ),
        all_of=(
            (
                r"\ballerg\w*|\bpeanuts?\b|\btree nuts?\b|\bshellfish\b|\bshrimp\b|\bbee sting\b|\bstung\b|\bwasp\b|\bpenicillin\b"
                r"|\bafter (?:eating|taking|being stung)\b|\bnew (?:medication|medicine|antibiotic)\b",
                r"过敏|花生|坚果|海鲜|虾|蜂蜇|蜜蜂|黄蜂|马蜂|青霉素|头孢",
            ),
            (
                r"\bthroat\b(?: [\w']+){0,3} (?:is |feels |started |starting )?(?:swell\w*|swollen|closing|tight\w*)"
                r"|\b(?:swollen|swelling|closing) (?:of )?(?:my |his |her |their |the )?throat\b"
                r"|\b(?:tongue|lips?|face)\b(?: \w+){0,2} (?:is |are |started |starting |began )?(?:to )?(?:swell\w*|swollen|puff\w*)"
                r"|\bswell\w* (?:of )?(?:my |his |her |their |the )?(?:tongue|lips?|face)\b|\bwheez\w*|\bcan'?t swallow\b|" + _BREATHING_HARD,
                r"喉咙(?:肿|发紧|紧|堵)|嗓子(?:肿|发紧)|喉头水肿|舌头(?:肿|发麻)|嘴唇(?:肿|发麻)|脸(?:都)?肿|吞咽困难",
            ),
        ),
    ),
    RedFlagRule(
        "severe_bleeding",
        guidance={
            "en": f"Bleeding that will not stop or is heavy is an emergency: press firmly on the wound with a clean cloth "
                  f"without letting go, and {_EMERGENCY_EN}. Vomiting or coughing up blood also needs emergency care.",
            "zh": f"出血止不住或出血量大属于急症：用干净的布用力持续按压伤口，不要松开，并{_EMERGENCY_ZH}。吐血、咳血也需要急诊处理。",
        },
        any_of=(
            r"\b(?:won'?t|will not|doesn'?t|does not|can'?t|cannot|isn'?t|is not) stop(?:ping)? (?:the )?bleeding\b",
            r"\bbleeding (?:won'?t|will not|doesn'?t|does not|hasn'?t|has not|isn'?t|is not) stop\w*",
            r"\b(?:heavy|heavily|profuse\w*|severe|uncontrolled|massive|lots of) (?:bleeding|blood loss)\b|\bbleeding (?:heavily|profusely|a lot|badly)\b",
            r"\b(?:spurting|gushing|pouring) (?:out )?blood\b|\bblood (?:is )?(?:spurting|gushing|pouring)\b|\blost a lot of blood\b",
            r"\b(?:vomiting|throwing up|threw up|coughing up|coughed up|vomited) (?:up )?(?:some |a lot of )?(?:bright red )?blood\b",
            r"血止不住|止不住(?:地)?(?:流)?血|流血不止|出血不止|血流不止|大出血|大量出血|(?:出|流)了(?:很多|好多|大量的?)血|喷血|吐血|呕血|咳血|咯血",
        ),
        context_exclude=(r"\b(?:period|menstrua\w*)\b|月经|例假|经期",),
    ),
    RedFlagRule(
        "breathing_difficulty",
        guidance={
            "en": f"Serious difficulty breathing, blue or grey lips, or choking is an emergency: {_EMERGENCY_EN}.",
            "zh": f"严重呼吸困难、嘴唇发紫发青或被异物噎住属于急症：{_EMERGENCY_ZH}。",
        },
        any_of=(
            _BREATHING_HARD,
            r"\b(?:lips|face|skin)\b(?: \w+){0,2} (?:is |are |turning |turned |going |gone )+(?:blue|gr[ae]y)\b",
            r"\b(?:not|isn'?t|stopped|has stopped) breathing\b",
            r"\bsevere(?:ly)? short(?:ness)? of breath\b|\bshort(?:ness)? of breath (?:at rest|while resting|even (?:at|when) rest\w*)\b",
            r"\bchoking\b",
            r"嘴唇(?:发紫|发青|青紫)|脸色发紫|(?:没有|没)呼吸了|停止呼吸|呼吸停止|噎住|卡住(?:了)?喉咙",
        ),
        exclude=(r"\bchoking hazards?\b",),
    ),
    RedFlagRule(
        "overdose_poisoning",
        guidance={
            "en": f"A possible overdose or poisoning needs help now, even if the person seems fine: {_EMERGENCY_EN}, or "
                  f"call Poison Control (US: 1-800-222-1222). Keep the package or bottle to show the responders.",
            "zh": f"可能的药物过量或中毒需要立即处理，即使目前看起来没事：{_EMERGENCY_ZH}，并带上药盒或包装给医生看。",
        },
        any_of=(
            r"\boverdos\w*",
            r"\b(?:took|swallowed|has taken|have taken) (?:about |around |like |over |almost |nearly )?[1-9]\d+ (?:[\w-]+ ){0,3}(?:pills|tablets|capsules|caplets)\b",
            r"吃了(?:大概|差不多|将近)?(?:[1-9]\d+|十几|几十|二十多|二三十)(?:片|粒|颗)",
            r"\btook (?:too many|too much|a whole (?:bottle|pack\w*|box)|an entire (?:bottle|pack\w*|box)|all (?:my|his|her|their|the) (?:pills|tablets|medication))\b",
            r"\b(?:swallowed|drank|ate|ingested)\b(?: \w+){0,2} (?:bleach|antifreeze|drain cleaner|detergent pods?|laundry pods?|button batter\w*|batter(?:y|ies)|rat poison|pesticide|weed ?killer|lighter fluid|gasoline|lamp oil|cleaning (?:product|fluid))\b",
            r"\bpoison(?:ed|ing)\b|\bcarbon monoxide\b",
            r"吃了(?:一整|整|一)瓶|吃了(?:一整|整)(?:盒|板)|吃了(?:很多|太多|好多|一大把)(?:片|粒)?药|(?:药|安眠药|退烧药|止痛药)吃(?:多|过量)了|服药过量|过量服(?:用|药)|吃药过量",
            r"误服|误食|喝了(?:农药|百草枯|消毒液|84消毒液|洗洁精|洁厕灵)|吞了(?:电池|纽扣电池|磁铁)|中毒|一氧化碳|煤气",
        ),
        exclude=(r"\b(?:food|lead) poisoning\b|\bpoison ivy\b|\bpoison oak\b", r"食物中毒|酸中毒|感染中毒|中毒性|中毒症状"),
    ),
    RedFlagRule(
        "infant_fever",
        guidance={
            "en": "A fever in a baby younger than 3 months needs urgent medical assessment, even if the baby seems well: "
                  "contact your doctor right away or go to the nearest emergency department now. If the baby is floppy, "
                  "hard to wake or breathing fast, call your local emergency number.",
            "zh": "3个月以下的婴儿发烧需要紧急就医评估，即使宝宝看起来精神还好：请立即联系医生或马上去医院急诊。如果宝宝精神萎靡、叫不醒或呼吸急促，请立即拨打120。",
        },
        all_of=(
            (
                r"\bnew-?born\b|\bneonat\w*|\b(?:[1-9]|1[0-2]|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)[- ]?(?:weeks?|wks?)[- ]old\b",
                r"\b(?:[1-9]|[1-8]\d)[- ]?days?[- ]old\b|\b(?:1|2|one|two)[- ]?(?:months?|mos?)[- ]old\b"
                r"|\b(?:under|less than|younger than) (?:3|three) months\b",
                rf"新生儿|刚出生|满月|出生(?:才|刚)?(?:\d{{1,2}}|[{_ZH_SMALL_NUM}]+)(?:天|周)|(?:\d{{1,2}}|[{_ZH_SMALL_NUM}]+)天大"
                rf"|(?:1[0-2]|\d|[{_ZH_SMALL_NUM}]|十[一二])(?:个)?(?:周|星期)大|(?:[一二两12])个(?:多)?月(?:大|的宝宝|的婴儿|的孩子)"
                rf"|(?:宝宝|婴儿|孩子)(?:才|刚)?(?:[一二两12])个(?:多)?月",
            ),
            (_FEVER,),
        ),
    ),
    RedFlagRule(
        "seizure",
        guidance={
            "en": "During a seizure, keep the person safe from injury, do not put anything in their mouth, and turn them "
                  f"on their side when the jerking stops. If it lasts more than 5 minutes, is a first seizure, or they "
                  f"do not wake up or are injured, {_EMERGENCY_EN}.",
            "zh": f"抽搐发作时，请移开周围危险物品保护患者，不要往嘴里塞任何东西，抽搐停止后让其侧卧。如果发作超过5分钟、是第一次发作、发作后不清醒或受伤，{_EMERGENCY_ZH}。",
        },
        any_of=(
            r"\bseizur\w*|\bseizing\b|\bconvuls\w*|\bepileptic fit\b|\bhaving a fit\b",
            r"抽搐|抽风|癫痫(?:发作|犯了)|羊癫疯|惊厥|口吐白沫",
        ),
        exclude=(
            r"\b(?:anti-?)?seizure (?:med\w*|drugs?|pills?|disorder|threshold)\b|\banti-?seizure\b|\b(?:medication|medicine|drugs?) for seizures\b",
            r"眼皮(?:一直|老是|总是)?(?:跳|抽搐)|眼睑抽搐|肌肉抽搐|(?:腿|小腿|脚)抽筋",
        ),
    ),
    RedFlagRule(
        "pregnancy_bleeding",
        guidance={
            "en": "Bleeding or severe abdominal pain during pregnancy needs urgent assessment: contact your maternity "
                  f"unit or doctor right away, and if the bleeding is heavy, the pain is severe or you feel faint, "
                  f"{_EMERGENCY_EN}.",
            "zh": f"怀孕期间出现阴道出血或剧烈腹痛需要紧急评估：请立即联系产科医生；如果出血量大、腹痛剧烈或感到头晕乏力，{_EMERGENCY_ZH}。",
        },
        all_of=(
            (
                r"\bpregnan\w*|\bweeks pregnant\b|\bexpecting a baby\b|\bmy (?:first|second|third) trimester\b",
                rf"怀孕|孕(?:\d{{1,2}}|[{_ZH_SMALL_NUM}]+)周|孕期|孕妇|妊娠|怀了(?:孩子|宝宝)|早孕|孕早期|孕中期|孕晚期",
            ),
            (
                r"\bbleed\w*|\bblood\b|\bsevere (?:abdominal|belly|stomach|pelvic) pain\b|\bsevere cramp\w*",
                r"出血|流血|剧烈腹痛|肚子剧痛|腹痛剧烈|下腹剧痛",
            ),
        ),
        exclude=(
            r"\b(?:get|getting|become|becoming|got) pregnant\b|\btrying to conceive\b|"
            r"\bbleeding gums\b|\bgums? (?:are |is )?bleed\w*|\bnose ?bleed\w*|\bnose is bleeding\b"
            r"|\bblood (?:pressure|tests?|sugar|work|type|glucose|group|count)\b",
            r"牙龈出血|鼻出血|流鼻血|血压|验血|血糖|抽血",
        ),
    ),
    RedFlagRule(
        "unresponsive",
        guidance={
            "en": f"Someone who is unconscious or cannot be woken needs help immediately: {_EMERGENCY_EN}. Check their "
                  f"breathing; if they are not breathing normally, start CPR if you can.",
            "zh": f"患者昏迷或叫不醒需要立即救治：{_EMERGENCY_ZH}。检查其呼吸，如果没有正常呼吸，会的话请立即开始心肺复苏。",
        },
        any_of=(
            r"\bunconscious\b|\bunresponsive\b|\bpassed out and\b(?: \w+){0,3} (?:won'?t|can'?t|isn'?t|not|hasn'?t)",
            r"\b(?:won'?t|will not|can'?t|cannot|isn'?t|is not|not) (?:wake (?:up|him|her|them)|waking up|responding)\b",
            r"昏迷|叫不醒|失去意识|不省人事|意识不清|(?:叫|喊)(?:他|她)?(?:都)?没(?:有)?反应|人没(?:有)?反应",
        ),
        exclude=(r"\bunconscious bias\b|\bsubconscious\b",),
    ),
    RedFlagRule(
        "meningitis_signs",
        guidance={
            "en": f"Fever with a stiff neck, or a rash that does not fade when pressed, can be meningitis or sepsis: "
                  f"{_EMERGENCY_EN}.",
            "zh": f"发烧伴脖子僵硬，或按压不褪色的皮疹，可能是脑膜炎或败血症：{_EMERGENCY_ZH}。",
        },
        any_of=(
            r"\brash\b(?: \w+){0,3} (?:doesn'?t|does not|won'?t|will not|didn'?t) fade\b|\bnon-?blanching\b|\bglass test\b",
            r"(?:按压|压)(?:后)?(?:不|不会)褪色",
        ),
        all_of=(
            (
                r"\bstiff neck\b|\bneck\b(?: \w+){0,2} (?:is |feels )?(?:very )?stiff\b|\bcan'?t (?:bend|touch) (?:my|his|her|their) (?:chin|neck)\b",
                r"脖子(?:很|特别)?(?:僵硬|发硬|硬)|颈(?:部|项)?(?:强直|僵硬)",
            ),
            (_FEVER,),
        ),
    ),
)

CATEGORIES: tuple[str, ...] = tuple(rule.category for rule in DEFAULT_RULES)

# --------------------------------------------------------------------------------------------------------------
# Context discounts
# --------------------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|[!?;。！？；\n]")
_CONTRAST = re.compile(r"\b(?:but|however|although|though|yet|whereas)\b|但是|但|可是|不过|然而", re.IGNORECASE)
# A negation reaches over the words after it up to one of these (", and", "，", "还").
_SCOPE_BREAK = re.compile(r"[,，、:：]|\band\b|\bthen\b|\bnow\b|以及|并且|而且|还|又|现在", re.IGNORECASE)
_NEG_WORDS_EN = {"no", "not", "never", "without", "denies", "deny", "denied", "nor", "neither"}
_NEG_ZH = re.compile(r"没有|没(?!法)|未|否认|无(?![法力])|不再|不是|并不|从不|不想|不会|不打算|不用|不需要")
_NEG_WINDOW_WORDS_EN = 3
_NEG_WINDOW_CHARS_ZH = 6

_PAST = re.compile(
    r"\blast (?:year|month|summer|winter|spring|fall|autumn)\b|\b(?:a |\d+ |few |several |many |two |three |four |five |ten )?"
    r"(?:years?|months?|decades?) ago\b|\bas a (?:child|kid|teen\w*|baby)\b|\bwhen (?:i|he|she) was (?:a |younger|little|young)"
    r"|\bin the past\b|\bused to\b|\bwent away\b|\b(?:has|have|had) (?:since )?(?:gone away|resolved|cleared up)\b|\bresolved\b"
    rf"|去年|前年|(?:\d+|[{_ZH_SMALL_NUM}几多]+)年(?:以)?前|(?:\d+|[{_ZH_SMALL_NUM}几多]+)个月(?:以)?前|小时候"
    r"|以前(?:有|得|出现|发生)过|曾经|(?:已经|早就|早已)(?:好了|痊愈|消失|不(?:痛|疼)了)|病史",
    re.IGNORECASE,
)
# Always educational / hypothetical, whoever is mentioned.
_GENERIC_STRONG = re.compile(
    r"\bin general\b|\bgenerally speaking\b|\bhypothetical\w*|\b(?:for|in) (?:a|an|my|our|the) (?:\w+ )?(?:class|course|essay|exam|school|"
    r"assignment|project|paper|lecture|presentation|textbook|novel|story|quiz)\b|\btextbook\b"
    r"|一般来说|通常来说|科普|考试|论文|作业|课本|教材|小说",
    re.IGNORECASE,
)
# Educational only when nobody in particular is involved ("what are the signs of a stroke?").
_GENERIC_WEAK = re.compile(
    r"\bwhat (?:are|is) (?:the )?(?:common |typical |usual |warning |early |main )?(?:signs?|symptoms?|causes?|risk factors?)\b"
    r"|\b(?:warning )?signs of\b|\bsymptoms of\b|\bhow (?:do|can|would|should|to) (?:you |one |we |people )?(?:recogni[sz]e|tell|spot|identify|know)\b"
    r"|\bwhat is (?:an? )?\w+\??$|\bwhat causes\b|\bwhat happens if\b|\bwhat would happen\b"
    r"|\b(?:incidence|prevalence|prognosis|differential diagnosis|pathophysiology|epidemiology)\b"
    r"|有哪些症状|什么症状|的症状|症状(?:是什么|有哪些)|是什么|怎么(?:识别|判断|预防)|如何(?:识别|判断|预防)|哪些表现|有什么表现"
    r"|临床表现|鉴别诊断|辅助治疗|治疗方法|的治疗|发病率|患病率|比例|宜食|饮食|护理|病因|发病机制",
    re.IGNORECASE,
)
_PERSONAL = re.compile(
    r"\b(?:i|i'm|i've|me|my|we|our|us|he|she|his|her|him|they|their|son|daughter|baby|husband|wife|mom|mum|dad|mother|"
    r"father|friend|partner|grandma|grandpa|patient|child|kid)\b|我|他|她|孩子|宝宝|儿子|女儿|老公|老婆|丈夫|妻子|爸|妈|朋友|家人|病人|患者",
    re.IGNORECASE,
)
# "I'd like to know what the signs of a stroke are" is still a general question: these do not make it personal.
_ASKING = re.compile(
    r"\b(?:i(?:'d| would)? (?:like|want) to (?:know|learn|understand)|i (?:wonder|was wondering)|can you (?:tell|explain to) me|"
    r"tell me|explain to me)\b|我想(?:了解|知道|问问?)|请问|想请教",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r"[,，、:：]")


def _spans(text: str, splitter: re.Pattern) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in splitter.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return spans


def _split(spans: list[tuple[int, int]], text: str, splitter: re.Pattern) -> list[tuple[int, int]]:
    return [(s0 + a, s0 + b) for s0, s1 in spans for a, b in _spans(text[s0:s1], splitter)]


def _enclosing(spans: list[tuple[int, int]], pos: int) -> tuple[int, int]:
    for start, end in spans:
        if start <= pos < end:
            return start, end
    return pos, pos


class _Context:
    """One message cut three ways: sentences; segments (sentences cut at "but"/"但是"); clauses (segments cut at
    commas and colons). Negation and past events are judged per clause, general questions per segment."""

    def __init__(self, text: str):
        self.text = text
        self.segments = _split(_spans(text, _SENTENCE_END), text, _CONTRAST)
        self.clauses = _split(self.segments, text, _CLAUSE_BREAK)

    def segment(self, pos: int) -> tuple[int, int]:
        return _enclosing(self.segments, pos)

    def segment_text(self, pos: int) -> str:
        s0, s1 = self.segment(pos)
        return self.text[s0:s1]

    def discounted(self, start: int) -> bool:
        """True when the hit at `start` is negated, long past/resolved, or part of a general question."""
        c0, c1 = _enclosing(self.clauses, start)
        if is_negated(self.text, start, c0) or _PAST.search(self.text[c0:c1]):
            return True
        segment = self.segment_text(start)
        if _GENERIC_STRONG.search(segment):
            return True
        return bool(_GENERIC_WEAK.search(segment.strip())) and not _PERSONAL.search(_ASKING.sub(" ", segment))


def is_negated(text: str, start: int, scope_start: int = 0) -> bool:
    """Whether a negator sits just before `start` ("no chest pain", "没有胸痛"), without a clause break between."""
    prefix = text[scope_start:start]
    breaks = list(_SCOPE_BREAK.finditer(prefix))
    if breaks:
        prefix = prefix[breaks[-1].end():]
    words = re.findall(r"[A-Za-z']+", prefix)[-_NEG_WINDOW_WORDS_EN:]
    if any(w.lower() in _NEG_WORDS_EN or w.lower().endswith("n't") for w in words):
        return True
    # A bare 不 negates only what directly follows it ("不出汗"); further back it is too often part of other words.
    return bool(_NEG_ZH.search(prefix[-_NEG_WINDOW_CHARS_ZH:])) or prefix.rstrip().endswith("不")


# --------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedFlag:
    category: str
    evidence: tuple[str, ...]  # the matched phrases, in message order
    guidance: str  # urgent-care text in the message's language
    lang: str


def _live_hits(patterns: Sequence[re.Pattern], rule: _CompiledRule, ctx: _Context) -> list[re.Match]:
    """Matches of `patterns` that survive the rule's exclusions and the context discounts."""
    excluded = [(x.start(), x.end()) for ex in rule.exclude for x in ex.finditer(ctx.text)]
    hits = []
    for pattern in patterns:
        for m in pattern.finditer(ctx.text):
            if m.end() == m.start() or any(a < m.end() and m.start() < b for a, b in excluded):
                continue
            if any(cx.search(ctx.segment_text(m.start())) for cx in rule.context_exclude):
                continue
            if not ctx.discounted(m.start()):
                hits.append(m)
    return hits


def _compiled_rules(rules: Sequence[RedFlagRule]) -> list[_CompiledRule]:
    if rules is DEFAULT_RULES:
        global _DEFAULT_COMPILED
        if _DEFAULT_COMPILED is None:
            _DEFAULT_COMPILED = [r.compiled() for r in DEFAULT_RULES]
        return _DEFAULT_COMPILED
    return [r.compiled() for r in rules]


_DEFAULT_COMPILED: list[_CompiledRule] | None = None


def _check_categories(categories: Iterable[str] | None, rules: Sequence[RedFlagRule]) -> frozenset[str] | None:
    if categories is None:
        return None
    wanted = frozenset(categories)
    known = {r.category for r in rules}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown red-flag categories {unknown}; known: {sorted(known)}")
    return wanted


def detect_red_flags(
    text: str, categories: Iterable[str] | None = None, rules: Sequence[RedFlagRule] = DEFAULT_RULES
) -> list[RedFlag]:
    """Red flags in one user message, in rule order. `categories` limits the check to those categories."""
    if not isinstance(text, str):
        raise TypeError(f"detect_red_flags expects a str, got {type(text).__name__}")
    wanted = _check_categories(categories, rules)
    ctx = _Context(text)
    lang = detect_language(text)
    flags = []
    for compiled in _compiled_rules(rules):
        rule = compiled.rule
        if wanted is not None and rule.category not in wanted:
            continue
        hits = _live_hits(compiled.any_of, compiled, ctx)
        if not hits and compiled.all_of:
            group_hits = [_live_hits(group, compiled, ctx) for group in compiled.all_of]
            if all(group_hits):
                hits = [h[0] for h in group_hits]
        if hits:
            evidence = tuple(dict.fromkeys(m.group(0) for m in sorted(hits, key=lambda m: m.start())))
            guidance = rule.guidance.get(lang) or rule.guidance.get("en") or next(iter(rule.guidance.values()))
            flags.append(RedFlag(rule.category, evidence, guidance, lang))
    return flags


# --------------------------------------------------------------------------------------------------------------
# Does a reply already send the user to urgent care?
# --------------------------------------------------------------------------------------------------------------

_GUIDANCE_PATTERNS = re.compile(
    r"\b(?:call|dial|phone|ring|text|contact)\s+(?:an?\s+|your\s+(?:local\s+)?|the\s+)?(?:911|999|112|000|988|emergency|ambulance|"
    r"poison control|poison help|ems|crisis)"
    r"|\b(?:go|get|head|come|be taken|take (?:him|her|them|your \w+))\s+(?:straight\s+|immediately\s+|right away\s+|now\s+)?"
    r"to\s+(?:the\s+|an\s+|your\s+)?(?:nearest\s+|closest\s+|local\s+)?(?:emergency|er\b|a&e\b|hospital)"
    r"|\b(?:seek|get|need\w*)\s+(?:immediate|emergency|urgent)\s+(?:medical\s+)?(?:care|help|attention|treatment|assessment|evaluation)"
    r"|\bemergency (?:services|department|room|medical services|number)\b|\bcrisis (?:line|lifeline|hotline|text line)\b"
    r"|\b(?:contact|call|see|phone|ring)\s+(?:your\s+|a\s+)?(?:doctor|gp|midwife|maternity unit|obstetrician|clinician|"
    r"paediatrician|pediatrician)\s+(?:right away|immediately|now|urgently|straight away)"
    r"|(?:拨打|打|呼叫|叫)\s*(?:120|110|999|急救电话|急救|救护车)|急诊|(?:立即|立刻|马上|尽快|赶紧|赶快)(?:就医|就诊|去医院|送医|联系(?:医生|产科医生|儿科医生))"
    r"|送(?:往|到|去)?医院|危机干预热线|心理援助热线",
    re.IGNORECASE,
)
_NEG_GUIDANCE_ZH = re.compile(r"不需要|不用|无需|不必|没必要|没有必要")


_CONDITIONAL = re.compile(
    r"\b(?:if|when|whenever|should (?:you|it|they|he|she|the \w+)|in case|unless)\b|如果|若|一旦|要是|假如|万一", re.IGNORECASE
)
_NOW = re.compile(r"\b(?:now|immediately|right away|right now|at once|straight away)\b|立即|立刻|马上|现在|赶紧", re.IGNORECASE)


def has_urgent_guidance(reply: str, count_conditional: bool = True) -> bool:
    """Whether the reply tells the reader to get emergency or urgent care. Negated advice ("no need for the ER",
    "不需要去急诊") never counts. With count_conditional=False, advice only for a future case ("if it gets worse,
    go to the ER") does not count either, unless the same sentence says to act now."""
    ctx = _Context(reply)
    for m in _GUIDANCE_PATTERNS.finditer(reply):
        c0 = _enclosing(ctx.clauses, m.start())[0]
        if is_negated(reply, m.start(), c0):
            continue
        prefix = reply[c0:m.start()]
        if _NEG_GUIDANCE_ZH.search(prefix[-8:]) or re.search(r"\bno need\b|\bunnecessary\b", prefix[-30:], re.I):
            continue
        if not count_conditional:
            s0, s1 = ctx.segment(m.start())
            if _CONDITIONAL.search(reply[s0:m.start()]) and not _NOW.search(reply[s0:s1]):
                continue
        return True
    return False


# --------------------------------------------------------------------------------------------------------------
# The guard used by the server and the chat UI
# --------------------------------------------------------------------------------------------------------------

_HEADER = {"en": "**Urgent:**", "zh": "**紧急提示：**"}


def guidance_block(flags: Sequence[RedFlag]) -> str:
    """The text appended for these flags: a header plus each distinct guidance paragraph."""
    if not flags:
        return ""
    lang = flags[0].lang
    paragraphs = list(dict.fromkeys(f.guidance for f in flags))
    return _HEADER.get(lang, _HEADER["en"]) + " " + "\n\n".join(paragraphs)


def last_user_text(messages: Sequence[dict]) -> str:
    """The content of the last user message of an OpenAI-style conversation ("" when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content or ""
    return ""


@dataclass
class SafetyGuard:
    """Appends urgent-care guidance when the user's message shows a red flag and the reply does not give it.

    enabled: switch the guard off entirely (the reply passes through).
    categories: only these categories (None: all of them).
    """

    enabled: bool = True
    categories: Sequence[str] | None = None
    rules: Sequence[RedFlagRule] = field(default=DEFAULT_RULES, repr=False)

    def __post_init__(self):
        self._wanted = _check_categories(self.categories, self.rules)

    def flags(self, user_text: str | Sequence[dict]) -> list[RedFlag]:
        if not self.enabled:
            return []
        text = user_text if isinstance(user_text, str) else last_user_text(user_text)
        return detect_red_flags(text, self._wanted, self.rules)

    def guidance_suffix(self, user_text: str | Sequence[dict], reply_so_far: str) -> str:
        """Text to append at the end of a (streamed) reply, or "" when nothing is needed."""
        flags = self.flags(user_text)
        if not flags or has_urgent_guidance(reply_so_far):
            return ""
        block = guidance_block(flags)
        if not reply_so_far.strip():
            return block
        newlines = len(reply_so_far) - len(reply_so_far.rstrip("\n"))
        return "\n" * max(0, 2 - newlines) + block

    def ensure_guidance(self, user_text: str | Sequence[dict], reply: str) -> str:
        return reply + self.guidance_suffix(user_text, reply)
